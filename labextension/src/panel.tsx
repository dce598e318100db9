/** The sidebar: GPUs, the active notebook's choice, volumes, sessions, spend. */
import { ReactWidget, UseSignal } from '@jupyterlab/ui-components';
import { Poll } from '@lumino/polling';
import { Message } from '@lumino/messaging';
import React, { useEffect, useState } from 'react';

import {
  attachHint,
  formatBytes,
  formatDuration,
  formatUsd,
  gpuChoices,
  holder,
  idleLeft,
  IGPU,
  plural,
  pollInterval,
  todaySpend,
  utilPercent
} from './model';
import { SidebarState } from './state';
import { NotebookChoice } from './choice';
import { Budgets, SpendChart } from './spendChart';

const MAX_INTERVAL_MS = 60_000;

function ErrorLine(props: { text: string | null }): JSX.Element | null {
  return props.text ? (
    <div className="jp-gpu-error" role="alert">
      {props.text}
    </div>
  ) : null;
}

function GPURow(props: { gpu: IGPU; mine: string[] }): JSX.Element {
  const g = props.gpu;
  const util = utilPercent(g);
  const memory =
    g.memory_used_bytes !== null ? `${formatBytes(g.memory_used_bytes)} / ${formatBytes(g.memory_bytes)}` : formatBytes(g.memory_bytes);
  const who = holder(g, props.mine);
  return (
    <li className="jp-gpu-gpu" data-held={who !== 'free'}>
      <div className="jp-gpu-row">
        <span className="jp-gpu-name">
          GPU {g.index}: {g.model}
          {g.simulated ? ' (simulated)' : ''}
        </span>
        <span className="jp-gpu-holder">{who}</span>
      </div>
      <div
        className="jp-gpu-bar"
        role="meter"
        aria-valuemin={0}
        aria-valuemax={100}
        aria-valuenow={util ?? undefined}
        title={util === null ? 'no utilisation reading' : `utilisation ${util.toFixed(0)}%`}
      >
        <div className="jp-gpu-bar-fill" style={{ width: `${util ?? 0}%` }} />
      </div>
      <div className="jp-gpu-detail">
        {util !== null ? `util ${util.toFixed(0)}%` : g.simulated ? 'no reading' : 'util —'} · {memory}
      </div>
    </li>
  );
}

/** Re-renders every second for the idle countdowns, only while shown. */
function useTick(): number {
  const [now, setNow] = useState(Date.now());
  useEffect(() => {
    const id = window.setInterval(() => setNow(Date.now()), 1000);
    return () => window.clearInterval(id);
  }, []);
  return now;
}

function Sessions(props: { state: SidebarState }): JSX.Element {
  const s = props.state;
  const now = useTick();
  if (!s.sessions.length) {
    return <p className="jp-gpu-empty">No sessions: a %%gpu cell starts one.</p>;
  }
  return (
    <ul className="jp-gpu-list">
      {s.sessions.map(x => {
        const left = idleLeft(x, s.fetchedAt, now);
        return (
          <li key={x.id} className="jp-gpu-session">
            <div className="jp-gpu-row">
              <span className="jp-gpu-name" title={x.notebook || x.id}>
                {(x.notebook || x.id).split('/').pop()}
              </span>
              <button
                className="jp-mod-styled jp-mod-warn jp-gpu-release"
                onClick={() => void s.release(x.id)}
                title="Stop this session's worker and return its GPUs"
              >
                Release
              </button>
            </div>
            <div className="jp-gpu-detail">
              {x.device} · {x.state} · held {formatDuration(x.held_s)} · {formatUsd(x.usd)}
              {left !== null ? ` · released in ${formatDuration(left)}` : ''}
            </div>
            {attachHint(x) !== null && (
              <div className="jp-gpu-detail jp-gpu-attach" title="Run this in a notebook to take the session over">
                {attachHint(x)}
              </div>
            )}
          </li>
        );
      })}
    </ul>
  );
}

function Volumes(props: { state: SidebarState }): JSX.Element {
  const s = props.state;
  const [name, setName] = useState('');
  const create = (e: React.FormEvent) => {
    e.preventDefault();
    if (name.trim()) {
      void s.createVolume(name.trim()).then(() => setName(''));
    }
  };
  return (
    <>
      <ErrorLine text={s.errors.volumes.current} />
      <ul className="jp-gpu-list">
        {s.volumes.map(v => (
          <li key={v.name} className="jp-gpu-volume">
            <div className="jp-gpu-row">
              <span className="jp-gpu-name">{v.name}</span>
              {v.in_use_by.length ? (
                <span className="jp-gpu-holder">mounted</span>
              ) : (
                <button className="jp-mod-styled jp-gpu-delete" onClick={() => void s.deleteVolume(v.name)}>
                  Delete
                </button>
              )}
            </div>
          </li>
        ))}
      </ul>
      <form className="jp-gpu-create" onSubmit={create}>
        <input
          className="jp-mod-styled"
          placeholder="new volume name"
          aria-label="new volume name"
          value={name}
          onChange={e => setName(e.target.value)}
        />
        <button className="jp-mod-styled jp-mod-accept" type="submit">
          Create
        </button>
      </form>
    </>
  );
}

function Spend(props: { state: SidebarState }): JSX.Element {
  const spend = props.state.spend;
  return (
    <div className="jp-gpu-spend">
      <ErrorLine text={props.state.errors.spend.current} />
      {spend ? (
        <>
          <div className="jp-gpu-total">Today: {formatUsd(todaySpend(spend))}</div>
          <SpendChart days={spend.days} />
          <Budgets budgets={spend.budgets ?? []} />
          <div className="jp-gpu-detail">
            Last {plural(spend.days.length, 'day')}: {formatUsd(spend.total_usd)}
          </div>
          <ul className="jp-gpu-list">
            {spend.notebooks.slice(0, 5).map(n => (
              <li key={n.notebook} className="jp-gpu-detail" title={n.notebook}>
                {n.notebook.split('/').pop()}: {formatUsd(n.usd)} · {plural(n.cells, 'cell')}
              </li>
            ))}
          </ul>
        </>
      ) : null}
    </div>
  );
}

function Sidebar(props: { state: SidebarState; choice: NotebookChoice }): JSX.Element {
  const s = props.state;
  if (!s.loaded) {
    return <p className="jp-gpu-empty">Loading…</p>;
  }
  const mine = s.sessions.map(x => x.id);
  // While the daemon does not answer, what was last seen stays, dimmed.
  return (
    <div className={`jp-gpu-sidebar-body${s.errors.host.current ? ' jp-gpu-stale' : ''}`}>
      <ErrorLine text={s.errors.host.current} />
      <ErrorLine text={s.errors.action.current} />
      <h3 className="jp-gpu-heading">GPUs{s.backend ? ` · ${s.backend}` : ''}</h3>
      {s.gpus.length ? (
        <ul className="jp-gpu-list">
          {s.gpus.map(g => (
            <GPURow key={g.uuid} gpu={g} mine={mine} />
          ))}
        </ul>
      ) : (
        <p className="jp-gpu-empty">No GPUs on this host: cells run on its CPU.</p>
      )}
      <h3 className="jp-gpu-heading">This notebook</h3>
      <props.choice.Component choices={gpuChoices(s.gpus)} volumes={s.volumes.map(v => v.name)} />
      <h3 className="jp-gpu-heading">Volumes</h3>
      {s.hasVolumes ? (
        <Volumes state={s} />
      ) : (
        <p className="jp-gpu-empty">Volumes need the docker backend: `jupyter gpu daemon --backend docker`.</p>
      )}
      <h3 className="jp-gpu-heading">Sessions</h3>
      <Sessions state={s} />
      <h3 className="jp-gpu-heading">Spend</h3>
      <Spend state={s} />
    </div>
  );
}

/** The sidebar widget; its poll backs off on errors and stands by while hidden. */
export class GPUSidebar extends ReactWidget {
  readonly state = new SidebarState();
  private _poll: Poll;

  constructor(private _choice: NotebookChoice) {
    super();
    this.id = 'jupyter-gpu-sidebar';
    this.addClass('jp-gpu-sidebar');
    this._poll = new Poll({
      auto: true,
      factory: async () => {
        await this.state.refresh();
        const interval = pollInterval(this.state.sessions);
        if (interval !== this._poll.frequency.interval) {
          this._poll.frequency = { ...this._poll.frequency, interval };
        }
      },
      frequency: { interval: 3000, backoff: true, max: MAX_INTERVAL_MS },
      name: 'jupyter-gpu:sidebar',
      standby: () => this.isHidden || 'when-hidden'
    });
    _choice.changed.connect(() => this.update());
  }

  protected onAfterShow(msg: Message): void {
    super.onAfterShow(msg);
    void this._poll.refresh();
  }

  dispose(): void {
    this._poll.dispose();
    super.dispose();
  }

  render(): JSX.Element {
    return (
      <UseSignal signal={this.state.changed}>{() => <Sidebar state={this.state} choice={this._choice} />}</UseSignal>
    );
  }
}
