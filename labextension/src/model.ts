/**
 * What the sidebar shows, computed from the server extension's answers. Pure functions and
 * one small class, no JupyterLab imports, so jest tests them directly.
 */

/** One GPU of the host, as GET gpus returns it. */
export interface IGPU {
  index: number;
  model: string;
  name: string;
  uuid: string;
  memory_bytes: number;
  simulated: boolean;
  session: string | null;
  user: string | null;
  warm: boolean;
  util: number | null;
  memory_used_bytes: number | null;
}

export interface ISession {
  id: string;
  state: string;
  device: string;
  gpus: string[];
  idle_s: number;
  idle_timeout: number;
  held_s: number;
  usd: number;
  cells: number;
  notebook: string;
  detached?: boolean;
}

export interface IVolume {
  name: string;
  in_use_by: string[];
}

export interface IDaySpend {
  day: string;
  usd: number;
}

/** A budget the daemon enforces, in the words it gives (e.g. scope "you, today"). */
export interface IBudget {
  scope: string;
  limit_usd: number;
  spent_usd: number;
  left_usd: number;
}

/** GET cost?days=N: the last N local days of the daemon's host, today included. */
export interface ISpend {
  since: number;
  now: number;
  total_usd: number;
  today_usd?: number;
  notebooks: { notebook: string; usd: number; cells: number }[];
  /** Every day of the window, zero-filled, ascending (YYYY-MM-DD). */
  days: IDaySpend[];
  budgets?: IBudget[];
}

/** The days the sidebar's chart shows, today included. */
export const CHART_DAYS = 14;

const MONTHS = ['Jan', 'Feb', 'Mar', 'Apr', 'May', 'Jun', 'Jul', 'Aug', 'Sep', 'Oct', 'Nov', 'Dec'];

/** "Nov 24" for "2026-11-24" (the day as the daemon's host dates it; no time zone applied). */
export function dayLabel(day: string): string {
  const m = /^\d{4}-(\d{2})-(\d{2})$/.exec(day);
  return m ? `${MONTHS[Number(m[1]) - 1] ?? m[1]} ${Number(m[2])}` : day;
}

export interface IBar {
  day: string;
  usd: number;
  /** In chart units, out of the chart's height; a day with no spend gets a 1-unit stub. */
  height: number;
  /** The tooltip: "Nov 24: $0.0123". */
  label: string;
}

/** One bar per day, the largest day as tall as the chart. */
export function chartBars(days: IDaySpend[], height: number): IBar[] {
  const max = Math.max(0, ...days.map(d => d.usd));
  return days.map(d => ({
    day: d.day,
    usd: d.usd,
    height: d.usd > 0 && max > 0 ? Math.max(2, (d.usd / max) * height) : 1,
    label: `${dayLabel(d.day)}: ${formatUsd(d.usd)}`
  }));
}

/** What was spent today: the daemon's figure, else (an older daemon) the window's last day. */
export function todaySpend(spend: ISpend): number {
  if (typeof spend.today_usd === 'number') {
    return spend.today_usd;
  }
  return spend.days.length ? spend.days[spend.days.length - 1].usd : 0;
}

/** "Budget (you, today): $0.75 left of $1.00", or what went over it. */
export function budgetText(b: IBudget): string {
  if (b.left_usd <= 0) {
    return `Budget (${b.scope}): ${formatUsd(b.spent_usd)} of ${formatUsd(b.limit_usd)}, none left`;
  }
  return `Budget (${b.scope}): ${formatUsd(b.left_usd)} left of ${formatUsd(b.limit_usd)}`;
}

/** What `%%gpu` with no GPU argument uses, kept in notebook metadata under this key. */
export const METADATA_KEY = 'jupyter_gpu';

export interface INotebookChoice {
  gpu?: string;
  volumes?: string[];
}

/** Where a volume chosen in the sidebar is mounted on the worker. */
export const MOUNT_ROOT = '/mnt';

export function formatUsd(usd: number): string {
  return usd < 1 ? `$${usd.toFixed(4)}` : `$${usd.toFixed(2)}`;
}

export function formatBytes(n: number | null | undefined): string {
  if (n === null || n === undefined) {
    return '';
  }
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i++;
  }
  return i === 0 ? `${n.toFixed(0)} ${units[i]}` : `${n.toFixed(1)} ${units[i]}`;
}

/** "1 cell", "2 cells". */
export function plural(n: number, word: string): string {
  return `${n} ${word}${n === 1 ? '' : 's'}`;
}

/** "4:05" for seconds; negative counts as zero. */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h > 0 ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

/** Utilisation in [0, 100] for the bar, or null when the GPU gives no reading. */
export function utilPercent(gpu: IGPU): number | null {
  if (gpu.util === null || gpu.util === undefined || Number.isNaN(gpu.util)) {
    return null;
  }
  return Math.min(100, Math.max(0, gpu.util));
}

/** Who holds a GPU, in words. */
export function holder(gpu: IGPU, mySessions: string[]): string {
  if (gpu.warm) {
    return 'warm pool';
  }
  if (gpu.session && mySessions.includes(gpu.session)) {
    return 'yours';
  }
  if (gpu.user) {
    return `held by ${gpu.user}`;
  }
  return 'free';
}

/** Seconds until an idle session is released, counted from when it was fetched. */
/** For a session whose kernel went away (its cell may still run): how to take it over. */
export function attachHint(session: ISession): string | null {
  return session.detached ? `kernel gone: %gpu attach ${session.id}` : null;
}

export function idleLeft(session: ISession, fetchedAt: number, now: number): number | null {
  if (session.state !== 'idle' || !session.idle_timeout) {
    return null;
  }
  return Math.max(0, session.idle_timeout - session.idle_s - (now - fetchedAt) / 1000);
}

/** GPU requests to offer: each model on the host once, then "any" and "cpu". */
export function gpuChoices(gpus: IGPU[]): string[] {
  const models: string[] = [];
  for (const g of gpus) {
    if (!models.includes(g.model)) {
      models.push(g.model);
    }
  }
  return [...models, 'any', 'cpu'];
}

export function volumeSpec(name: string): string {
  return `${name}:${MOUNT_ROOT}/${name}`;
}

export function volumeName(spec: string): string {
  return spec.split(':')[0];
}

/** The notebook metadata for a choice; undefined when nothing is chosen. */
export function choiceMetadata(gpu: string, volumes: string[]): INotebookChoice | undefined {
  const out: INotebookChoice = {};
  if (gpu) {
    out.gpu = gpu;
  }
  if (volumes.length) {
    out.volumes = [...volumes].sort().map(volumeSpec);
  }
  return Object.keys(out).length ? out : undefined;
}

/** Read a choice back from metadata written by us or by hand; bad shapes read as nothing. */
export function readChoice(meta: unknown): { gpu: string; volumes: string[] } {
  const m = (meta && typeof meta === 'object' ? meta : {}) as Record<string, unknown>;
  const gpu = typeof m.gpu === 'string' ? m.gpu : '';
  const vols = Array.isArray(m.volumes) ? m.volumes.filter((v): v is string => typeof v === 'string') : [];
  return { gpu, volumes: vols.map(volumeName) };
}

/**
 * Code the sidebar runs silently in the notebook's kernel so an unsaved choice applies to
 * the next `%%gpu` cell at once. The JSON travels as a string literal Python reads back.
 */
export function kernelSnippet(choice: INotebookChoice | undefined): string {
  const arg = choice === undefined ? 'None' : `__import__("json").loads(${JSON.stringify(JSON.stringify(choice))})`;
  return `__import__("jupyter_gpu.notebook").notebook.use(${arg})`;
}

/** A readable line for a failed request: the server's message when it sent one. */
export function errorText(status: number, body: unknown, what: string): string {
  const b = (body && typeof body === 'object' ? body : {}) as Record<string, unknown>;
  const message = typeof b.message === 'string' && b.message ? b.message : '';
  if (status === 0) {
    return `Cannot reach the Jupyter server to ${what}.`;
  }
  if (status === 503) {
    return message || `The jupyter-gpu daemon is not reachable (${what}).`;
  }
  return message ? `Could not ${what}: ${message}` : `Could not ${what} (HTTP ${status}).`;
}

/**
 * Errors shown once: the same message again (every poll while a daemon is down) changes
 * nothing on screen; a success clears it.
 */
export class ErrorOnce {
  private _current: string | null = null;

  /** True when this message is new and should be shown. */
  report(message: string): boolean {
    if (message === this._current) {
      return false;
    }
    this._current = message;
    return true;
  }

  clear(): boolean {
    const had = this._current !== null;
    this._current = null;
    return had;
  }

  get current(): string | null {
    return this._current;
  }
}

/** Poll intervals in ms: quick while something runs, slower when the host is quiet. */
export function pollInterval(sessions: ISession[]): number {
  return sessions.some(s => s.state === 'busy' || s.state === 'starting') ? 1000 : 3000;
}
