/** The sidebar's data: fetched together, errors kept once per section. */
import { ISignal, Signal } from '@lumino/signaling';

import { requestAPI } from './api';
import { CHART_DAYS, ErrorOnce, IGPU, ISession, ISpend, IVolume } from './model';

export type Section = 'host' | 'volumes' | 'spend' | 'action';

export class SidebarState {
  gpus: IGPU[] = [];
  backend = '';
  /** Whether the daemon's backend has volumes (docker does, process does not). */
  hasVolumes = false;
  sessions: ISession[] = [];
  volumes: IVolume[] = [];
  spend: ISpend | null = null;
  fetchedAt = 0;
  loaded = false;
  readonly errors: Record<Section, ErrorOnce> = {
    host: new ErrorOnce(),
    volumes: new ErrorOnce(),
    spend: new ErrorOnce(),
    action: new ErrorOnce()
  };

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  /** One poll. Rejects when the host part failed, so the poll backs off. */
  async refresh(): Promise<void> {
    const noVolumes = Promise.resolve({ volumes: [] as IVolume[] });
    const [host, sessions, volumes, spend] = await Promise.allSettled([
      requestAPI<{ gpus: IGPU[]; backend: string; volumes: boolean }>('gpus', 'list GPUs'),
      requestAPI<{ sessions: ISession[] }>('sessions', 'list sessions'),
      // Asked only of a backend known to have volumes (the first poll learns which).
      this.loaded && !this.hasVolumes ? noVolumes : requestAPI<{ volumes: IVolume[] }>('volumes', 'list volumes'),
      requestAPI<ISpend>(`cost?days=${CHART_DAYS}`, 'read spend')
    ]);
    this.fetchedAt = Date.now();
    this.loaded = true;
    if (host.status === 'fulfilled' && sessions.status === 'fulfilled') {
      this.gpus = host.value.gpus;
      this.backend = host.value.backend;
      this.hasVolumes = host.value.volumes;
      this.sessions = sessions.value.sessions;
      this.errors.host.clear();
    } else {
      const reason = host.status === 'rejected' ? host.reason : (sessions as PromiseRejectedResult).reason;
      this.errors.host.report(String(reason.message ?? reason));
    }
    // One cause, one message: with the daemon down, the host's error says it all.
    const down = host.status === 'rejected';
    if (!down && !this.hasVolumes) {
      this.volumes = [];
      this.errors.volumes.clear();
    } else if (volumes.status === 'fulfilled') {
      this.volumes = volumes.value.volumes;
      this.errors.volumes.clear();
    } else {
      this.volumes = [];
      down ? this.errors.volumes.clear() : this.errors.volumes.report(String(volumes.reason.message ?? volumes.reason));
    }
    if (spend.status === 'fulfilled') {
      this.spend = spend.value;
      this.errors.spend.clear();
    } else {
      down ? this.errors.spend.clear() : this.errors.spend.report(String(spend.reason.message ?? spend.reason));
    }
    this._changed.emit();
    if (down) {
      throw host.reason;
    }
  }

  /** A user action (create, delete, release); its error shows until the next success. */
  async act(action: () => Promise<unknown>): Promise<void> {
    try {
      await action();
      this.errors.action.clear();
    } catch (e) {
      this.errors.action.report(String((e as Error).message ?? e));
    }
    await this.refresh().catch(() => undefined);
  }

  createVolume(name: string): Promise<void> {
    return this.act(() =>
      requestAPI('volumes', `create volume ${name}`, { method: 'POST', body: JSON.stringify({ name }) })
    );
  }

  deleteVolume(name: string): Promise<void> {
    return this.act(() =>
      requestAPI(`volumes/${encodeURIComponent(name)}`, `delete volume ${name}`, { method: 'DELETE' })
    );
  }

  release(id: string): Promise<void> {
    return this.act(() =>
      requestAPI(`sessions/${encodeURIComponent(id)}`, 'release the session', { method: 'DELETE' })
    );
  }

  private _changed = new Signal<this, void>(this);
}
