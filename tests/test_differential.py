"""The differential test, a bounded subset: notebooks that nbclient ships in its release
(tests/files of its sdist), run headless twice as they are and once with every code cell
under `%%gpu any` on a process-backend daemon; every cell steady between the two local runs
must show the same under %%gpu. `make differential` runs the whole corpus on both backends
(bench/differential.py; tests/differential/corpus.txt)."""

from __future__ import annotations

import differential as D
import pytest

# Clear Output: a cell ending with clear_output(wait=True) keeps its output, as locally (the
# cost line used to set the pending clear off and wipe it).
SUBSET = ("Inline Image.ipynb", "Factorials.ipynb", "SVG.ipynb", "Clear Output.ipynb")


@pytest.fixture(scope="module")
def nbclient_release():
    sources, excludes = D.read_corpus()
    [src] = [s for s in sources if s.requirement.startswith("nbclient==")]
    entries, _ = D.collect([src], excludes)
    return {e.path.name: e for e in entries}


def _check(entry: D.Entry, daemon) -> D.Result:
    local = D.run_local(entry)
    return D.compare(entry, local, D.run_gpu(entry, daemon.connection_file), "%%gpu (process)")


@pytest.fixture
def process_daemon(daemon_factory):
    return daemon_factory("--simulate-gpus=H100:1", "--WorkerDaemon.worker_heartbeat_interval=0.5")


@pytest.mark.parametrize("name", SUBSET)
def test_every_steady_cell_shows_the_same_under_gpu(name, nbclient_release, process_daemon):
    res = _check(nbclient_release[name], process_daemon)
    assert res.steady > 0 and res.wrapped > 0, D.report(res)
    assert res.matching == res.steady, D.report(res)
