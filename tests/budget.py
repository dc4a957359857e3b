"""The suite's time budget and the guard that keeps it (a pytest plugin, registered by conftest.py).

Per test, beside pytest's wall time: the seconds JAX spent making programs in this process (tracing, lowering,
and XLA compiling or loading from the persistent cache), how many programs that was (a model run op by op, not
under ``jit``, is hundreds), and the CPU seconds of the subprocesses it waited for.
At the end: the slowest tests, the total against the budget, and every test over the per-test ceiling by name
(``--budget-report=FILE`` also writes the table as Markdown). It works under pytest-xdist too: the workers
attach their figures to each report.

The guard: a model's train step is the suite's most expensive program, and a new process pays the imports and
its own compiles. So a test that runs the step of a :class:`diffjax.train.Trainer` of its own (one it builds,
directly or through the command line) must say why with ``@pytest.mark.trains("why")``, and one that starts a
process with ``@pytest.mark.process("why")``; anything else
gets its trained models, folders and processes from shared fixtures, built once: the session's in conftest.py,
or a test file's own of scope "module". What a function-scoped fixture builds counts as the test's.
"""

import json
import os
import resource
import subprocess
import time

import pytest

# What the suite must fit in on the 2-core machine, and what one test may take there (reported, not enforced:
# machine speed drifts by up to 30%, so a timed assertion would be flaky).
BUDGET_S = 25 * 60
CEILING_S = 60.0

_TRACE, _LOWER, _BACKEND = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                            "/jax/core/compile/backend_compile_duration")


class _Meter:
    """Counters the hooks read before and after each phase of a test."""

    def __init__(self):
        self.compile_s = 0.0
        self.programs = 0  # XLA programs compiled or loaded from the persistent cache
        self.trainers = []  # the Trainers built outside shared fixtures during this test
        self.processes = 0
        self.shared = 0  # > 0 while a fixture of scope module or wider is being set up

    def on_duration(self, event, duration, **_):
        if event in (_TRACE, _LOWER, _BACKEND):
            self.compile_s += duration
        self.programs += event == _BACKEND

    def trained(self) -> int:
        """How many of this test's own Trainers ran their train step (built, or only lowered, is free)."""
        return sum(t.step._cache_size() > 0 for t in self.trainers)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Budget:
    def __init__(self, config):
        self.config = config
        self.meter = _Meter()
        self.rows = {}  # nodeid -> [wall s, compile s, subprocess CPU s, programs]
        self.spent = [0.0, 0.0, 0]
        self.start = time.time()
        self._install()

    # -- counting -----------------------------------------------------------------------------------------------
    def _install(self):
        import jax

        from diffjax import train

        jax.monitoring.register_event_duration_secs_listener(self.meter.on_duration)
        meter = self.meter
        trainer_init, popen_init = train.Trainer.__init__, subprocess.Popen.__init__

        def counting_trainer(self, *args, **kwargs):
            trainer_init(self, *args, **kwargs)
            if not meter.shared:
                meter.trainers.append(self)

        def counting_popen(self, *args, **kwargs):
            if not meter.shared:
                meter.processes += 1
            popen_init(self, *args, **kwargs)

        train.Trainer.__init__ = counting_trainer
        subprocess.Popen.__init__ = counting_popen
        self._restore = lambda: (setattr(train.Trainer, "__init__", trainer_init),
                                 setattr(subprocess.Popen, "__init__", popen_init))

    def pytest_unconfigure(self, config):
        self._restore()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        shared = fixturedef.scope != "function"  # built once per file or session: not the test's own
        self.meter.shared += shared
        try:
            yield
        finally:
            self.meter.shared -= shared

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.meter.trainers, self.meter.processes = [], 0
        self.spent = [0.0, 0.0, 0]  # compile s, subprocess CPU s, programs
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        report = outcome.get_result()
        if call.when == "teardown":
            self._check(item, report)

    def _check(self, item, report):
        """The guard: fail the test (at teardown) when it trained or started a process undeclared."""
        problems = []
        trained, self.meter.trainers = self.meter.trained(), []
        if trained and item.get_closest_marker("trains") is None:
            problems.append(f"trains {trained} Trainer(s) of its own: use a shared fixture (conftest.py's, or a "
                            f"module-scoped one), or mark the test @pytest.mark.trains('why it needs its own')")
        if self.meter.processes and item.get_closest_marker("process") is None:
            problems.append(f"starts {self.meter.processes} process(es): call the library or experiments.main.run "
                            f"in process, or mark the test @pytest.mark.process('why the process boundary matters')")
        if problems and report.passed:
            report.outcome = "failed"
            report.longrepr = f"{item.nodeid}: " + "; ".join(problems)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        yield from self._measured()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        yield from self._measured()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item):
        yield from self._measured()
        # Once, in the last phase's report (what reaches the controller under xdist).
        item.user_properties.append(("budget", tuple(self.spent)))

    def _measured(self):
        c0, p0, n0 = self.meter.compile_s, _children_cpu(), self.meter.programs
        yield
        self.spent[0] += self.meter.compile_s - c0
        self.spent[1] += _children_cpu() - p0
        self.spent[2] += self.meter.programs - n0

    # -- reporting (in the controller under xdist) ----------------------------------------------------------------
    def pytest_runtest_logreport(self, report):
        row = self.rows.setdefault(report.nodeid, [0.0, 0.0, 0.0, 0])
        row[0] += report.duration
        if report.when == "teardown":  # the properties accumulate over the phases: read them once
            for key, value in report.user_properties:
                if key == "budget":
                    row[1:] = value

    def table(self, n=30):
        rows = sorted(self.rows.items(), key=lambda kv: -kv[1][0])[:n]
        lines = ["| test | wall s | compile s | programs | subprocess CPU s |", "|---|---:|---:|---:|---:|"]
        lines += [f"| `{nodeid}` | {w:.1f} | {c:.1f} | {n} | {p:.1f} |" for nodeid, (w, c, p, n) in rows]
        return lines

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows or hasattr(self.config, "workerinput"):
            return
        tr = terminalreporter
        wall = time.time() - self.start
        tests = sum(r[0] for r in self.rows.values())
        compile_s = sum(r[1] for r in self.rows.values())
        proc_s = sum(r[2] for r in self.rows.values())
        tr.section("time budget")
        for line in self.table(int(self.config.getoption("budget_top"))):
            tr.write_line(line)
        ceiling = float(self.config.getoption("budget_ceiling"))
        over = sorted((nodeid, r[0]) for nodeid, r in self.rows.items() if r[0] > ceiling)
        tr.write_line(f"wall {wall / 60:.1f} min of the {BUDGET_S / 60:.0f} min budget; tests {tests / 60:.1f} min "
                      f"(summed over workers), of which compile {compile_s / 60:.1f} min and subprocess CPU "
                      f"{proc_s / 60:.1f} min")
        for nodeid, seconds in over:
            tr.write_line(f"over the {ceiling:g} s per-test ceiling: {nodeid} ({seconds:.0f} s)", yellow=True)
        if wall > BUDGET_S:
            tr.write_line(f"the suite took {wall / 60:.1f} min, over its {BUDGET_S / 60:.0f} min budget", red=True)
        path = self.config.getoption("budget_report")
        if path:
            with open(path, "w") as f:
                f.write("\n".join(self.table(10_000)) + "\n")
            with open(os.path.splitext(path)[0] + ".json", "w") as f:
                json.dump({"wall_s": wall, "rows": self.rows}, f, indent=1)


def add_options(parser):
    """conftest.py's ``pytest_addoption``."""
    group = parser.getgroup("budget", "the suite's time budget (tests/budget.py)")
    group.addoption("--budget-report", default=None, help="write every test's wall, compile and subprocess time "
                    "to this Markdown file (and a .json beside it)")
    group.addoption("--budget-top", default=30, type=int, help="how many of the slowest tests the summary lists")
    group.addoption("--budget-ceiling", default=CEILING_S, type=float, help="list every test slower than this "
                    "many seconds by name")
