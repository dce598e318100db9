import {
  attachHint,
  choiceMetadata,
  ErrorOnce,
  errorText,
  formatBytes,
  formatDuration,
  formatUsd,
  gpuChoices,
  holder,
  idleLeft,
  IGPU,
  ISession,
  kernelSnippet,
  plural,
  pollInterval,
  readChoice,
  utilPercent
} from '../model';

const gpu = (over: Partial<IGPU> = {}): IGPU => ({
  index: 0,
  model: 'H100',
  name: 'NVIDIA H100 80GB HBM3',
  uuid: 'GPU-0',
  memory_bytes: 80 * 1024 ** 3,
  simulated: true,
  session: null,
  user: null,
  warm: false,
  util: 0,
  memory_used_bytes: null,
  ...over
});

const session = (over: Partial<ISession> = {}): ISession => ({
  id: 's1',
  state: 'idle',
  device: 'H100',
  gpus: ['GPU-0'],
  idle_s: 10,
  idle_timeout: 300,
  held_s: 60,
  usd: 0.05,
  cells: 2,
  notebook: '/home/u/a.ipynb',
  ...over
});

describe('formatting', () => {
  it('formats money with cents precision that matters', () => {
    expect(formatUsd(0.0123)).toBe('$0.0123');
    expect(formatUsd(12.345)).toBe('$12.35');
  });
  it('formats bytes in binary units', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(80 * 1024 ** 3)).toBe('80.0 GiB');
    expect(formatBytes(null)).toBe('');
  });
  it('counts in words', () => {
    expect(plural(1, 'cell')).toBe('1 cell');
    expect(plural(0, 'cell')).toBe('0 cells');
  });
  it('formats durations as clocks', () => {
    expect(formatDuration(65)).toBe('1:05');
    expect(formatDuration(3725)).toBe('1:02:05');
    expect(formatDuration(-3)).toBe('0:00');
  });
});

describe('GPUs', () => {
  it('clamps utilisation and knows when there is no reading', () => {
    expect(utilPercent(gpu({ util: 140 }))).toBe(100);
    expect(utilPercent(gpu({ util: null }))).toBeNull();
  });
  it('says who holds a GPU', () => {
    expect(holder(gpu(), [])).toBe('free');
    expect(holder(gpu({ session: 's1', user: 'me' }), ['s1'])).toBe('yours');
    expect(holder(gpu({ session: null, user: 'bob' }), ['s1'])).toBe('held by bob');
    expect(holder(gpu({ warm: true }), [])).toBe('warm pool');
  });
  it('offers each model once, then any and cpu', () => {
    expect(gpuChoices([gpu(), gpu({ uuid: 'b' }), gpu({ model: 'A100-80GB', uuid: 'c' })])).toEqual([
      'H100',
      'A100-80GB',
      'any',
      'cpu'
    ]);
  });
});

describe('sessions', () => {
  it('counts down the idle release from the fetch time', () => {
    expect(idleLeft(session(), 1000, 11000)).toBe(280);
    expect(idleLeft(session({ state: 'busy' }), 0, 0)).toBeNull();
    expect(idleLeft(session({ idle_s: 400 }), 0, 0)).toBe(0);
  });
  it('shows how to attach to a session whose kernel went away', () => {
    expect(attachHint(session({ id: 'abc', detached: true }))).toBe('kernel gone: %gpu attach abc');
    expect(attachHint(session())).toBeNull();
  });
  it('polls faster while something runs', () => {
    expect(pollInterval([session({ state: 'busy' })])).toBeLessThan(pollInterval([session()]));
  });
});

describe('notebook choice', () => {
  it('writes metadata the magic reads, and nothing for no choice', () => {
    expect(choiceMetadata('H100', ['data', 'cache'])).toEqual({
      gpu: 'H100',
      volumes: ['cache:/mnt/cache', 'data:/mnt/data']
    });
    expect(choiceMetadata('', [])).toBeUndefined();
  });
  it('reads back its own metadata and survives hand-edited junk', () => {
    expect(readChoice({ gpu: 'A100', volumes: ['data:/mnt/data'] })).toEqual({ gpu: 'A100', volumes: ['data'] });
    expect(readChoice({ gpu: 3, volumes: 'x' })).toEqual({ gpu: '', volumes: [] });
    expect(readChoice(undefined)).toEqual({ gpu: '', volumes: [] });
  });
  it('pushes the choice as a Python expression that reads JSON back', () => {
    const code = kernelSnippet({ gpu: "H100'\"", volumes: ['d:/mnt/d'] });
    expect(code).toContain('jupyter_gpu.notebook');
    const literal = code.slice(code.indexOf('loads(') + 6, code.lastIndexOf('))'));
    expect(JSON.parse(JSON.parse(literal))).toEqual({ gpu: "H100'\"", volumes: ['d:/mnt/d'] });
    expect(kernelSnippet(undefined)).toContain('use(None)');
  });
});

describe('errors', () => {
  it('shows the server message for a daemon that is down', () => {
    expect(errorText(503, { message: 'lost contact with the daemon' }, 'list GPUs')).toBe(
      'lost contact with the daemon'
    );
    expect(errorText(409, { message: 'volume is mounted' }, 'delete volume d')).toBe(
      'Could not delete volume d: volume is mounted'
    );
    expect(errorText(500, '<html>', 'list GPUs')).toBe('Could not list GPUs (HTTP 500).');
    expect(errorText(0, null, 'list GPUs')).toContain('Cannot reach the Jupyter server');
  });
  it('reports the same error once until it clears', () => {
    const e = new ErrorOnce();
    expect(e.report('down')).toBe(true);
    expect(e.report('down')).toBe(false);
    expect(e.current).toBe('down');
    expect(e.clear()).toBe(true);
    expect(e.current).toBeNull();
    expect(e.report('down')).toBe(true);
  });
});
