/** jupyter-gpu's JupyterLab plugin: a left-sidebar panel. */
import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { INotebookTracker } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { NotebookChoice } from './choice';
import { GPUSidebar } from './panel';

const gpuIcon = new LabIcon({
  name: 'jupyter-gpu:chip',
  svgstr:
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" width="16"><g class="jp-icon3" fill="#616161">' +
    '<path d="M6 6h12v12H6z" fill-opacity="0.25"/><path d="M9 2h2v3H9zm4 0h2v3h-2zM9 19h2v3H9zm4 0h2v3h-2zM2 9h3v2H2zm0 4h3v2H2zm17-4h3v2h-3zm0 4h3v2h-3zM5 5h14v14H5zm2 2v10h10V7z"/>' +
    '</g></svg>'
});

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-gpu:sidebar',
  description: 'GPUs, volumes, sessions and spend of the jupyter-gpu daemon.',
  autoStart: true,
  requires: [INotebookTracker],
  optional: [ILayoutRestorer],
  activate: (app: JupyterFrontEnd, tracker: INotebookTracker, restorer: ILayoutRestorer | null) => {
    const sidebar = new GPUSidebar(new NotebookChoice(tracker));
    sidebar.title.icon = gpuIcon;
    sidebar.title.caption = 'jupyter-gpu: GPUs, volumes, sessions, spend';
    app.shell.add(sidebar, 'left', { rank: 600 });
    restorer?.add(sidebar, sidebar.id);
  }
};

export default plugin;
