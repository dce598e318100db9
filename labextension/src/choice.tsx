/**
 * The active notebook's GPU and volumes: kept in its metadata (so `%%gpu` with no GPU
 * argument uses them, headless runs included) and pushed into its kernel at once (so an
 * unsaved choice applies to the next cell).
 */
import { INotebookTracker, NotebookPanel } from '@jupyterlab/notebook';
import { ISignal, Signal } from '@lumino/signaling';
import React from 'react';

import { choiceMetadata, INotebookChoice, kernelSnippet, METADATA_KEY, readChoice } from './model';

export class NotebookChoice {
  constructor(private _tracker: INotebookTracker) {
    _tracker.currentChanged.connect(this._follow, this);
    this._follow();
  }

  get changed(): ISignal<this, void> {
    return this._changed;
  }

  get panel(): NotebookPanel | null {
    return this._tracker.currentWidget;
  }

  get current(): { gpu: string; volumes: string[] } {
    return readChoice(this.panel?.model?.getMetadata(METADATA_KEY));
  }

  set(gpu: string, volumes: string[]): void {
    const panel = this.panel;
    if (!panel?.model) {
      return;
    }
    const meta = choiceMetadata(gpu, volumes);
    if (meta === undefined) {
      panel.model.deleteMetadata(METADATA_KEY);
    } else {
      panel.model.setMetadata(METADATA_KEY, meta as any);
    }
    this._push(panel, meta);
    this._changed.emit();
  }

  /** Tell the kernel; silently, and harmless when jupyter-gpu is not installed there. */
  private _push(panel: NotebookPanel, meta: INotebookChoice | undefined): void {
    const kernel = panel.sessionContext.session?.kernel;
    if (kernel) {
      kernel.requestExecute({ code: kernelSnippet(meta), silent: true, store_history: false });
    }
  }

  private _follow(): void {
    const panel = this.panel;
    if (panel && !this._seen.has(panel)) {
      this._seen.add(panel);
      // A new kernel (start, restart, change) gets the notebook's choice too.
      panel.sessionContext.kernelChanged.connect(() => {
        const choice = panel.model?.getMetadata(METADATA_KEY);
        if (choice !== undefined) {
          this._push(panel, choice as INotebookChoice);
        }
      });
      panel.disposed.connect(() => this._seen.delete(panel));
    }
    this._changed.emit();
  }

  readonly Component = (props: { choices: string[]; volumes: string[] }): JSX.Element => {
    const panel = this.panel;
    if (!panel) {
      return <p className="jp-gpu-empty">Open a notebook to choose its GPU and volumes.</p>;
    }
    const { gpu, volumes } = this.current;
    const choices = gpu && !props.choices.includes(gpu) ? [gpu, ...props.choices] : props.choices;
    return (
      <div className="jp-gpu-choice">
        <label className="jp-gpu-row">
          <span title={panel.context.path}>GPU for {panel.context.path.split('/').pop()}</span>
          <select
            className="jp-mod-styled jp-gpu-select"
            aria-label="GPU for this notebook"
            value={gpu}
            onChange={e => this.set(e.target.value, volumes)}
          >
            <option value="">default</option>
            {choices.map(c => (
              <option key={c} value={c}>
                {c}
              </option>
            ))}
          </select>
        </label>
        {props.volumes.map(v => (
          <label key={v} className="jp-gpu-row jp-gpu-mount">
            <span>
              mount {v} at /mnt/{v}
            </span>
            <input
              type="checkbox"
              aria-label={`mount volume ${v}`}
              checked={volumes.includes(v)}
              onChange={e => this.set(gpu, e.target.checked ? [...volumes, v] : volumes.filter(x => x !== v))}
            />
          </label>
        ))}
      </div>
    );
  };

  private _seen = new Set<NotebookPanel>();
  private _changed = new Signal<this, void>(this);
}
