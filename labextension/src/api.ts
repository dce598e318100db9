/** Calls to the server extension under {base_url}/jupyter-gpu/api/. */
import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

import { errorText } from './model';

export class APIError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
  }
}

/** JSON from an endpoint; an APIError carrying a readable message otherwise. */
export async function requestAPI<T>(path: string, what: string, init: RequestInit = {}): Promise<T> {
  const settings = ServerConnection.makeSettings();
  const url = URLExt.join(settings.baseUrl, 'jupyter-gpu', 'api', path);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (e) {
    throw new APIError(0, errorText(0, null, what));
  }
  let body: unknown = null;
  try {
    body = await response.json();
  } catch {
    body = null;
  }
  if (!response.ok) {
    throw new APIError(response.status, errorText(response.status, body, what));
  }
  return body as T;
}
