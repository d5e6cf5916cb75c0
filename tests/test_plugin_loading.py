"""Plugin loading for real: --plugins-dir / TLFX_PLUGINS_DIR, broken plugins isolated, duplicate names refused,
and the minimal plugin printed in docs/plugins.md (extracted from the page, so the guide cannot rot)."""

from __future__ import annotations

import inspect
import os
import re
import textwrap
from pathlib import Path

import pytest
from conftest import run_cli

import tlfx
from tlfx.errors import TlfxError
from tlfx.plugins import DuplicateNameError, PluginManager, reset_plugin_manager

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"

GOOD = '''
import click
from torch import nn

import tlfx
from tlfx.backbone import Backbone, Preprocess, WeightsInfo


def mean_colour(weights=None, **options):
    return Backbone(name="mean_colour", module=nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()),
                    preprocess=Preprocess(16, 16), weights=WeightsInfo("none"))


@click.command(name="hello-plugin")
@click.argument("who", default="world")
def hello(who):
    """Say hello."""
    click.echo(f"hello, {who}, from a plugins-dir plugin")


@tlfx.hookimpl
def register_backbones(register):
    register("mean_colour", mean_colour, description="mean colour of 2x2 cells (12-d)")


@tlfx.hookimpl
def register_commands(cli):
    cli.add_command(hello)
'''

BROKEN_IMPORT = '''
import tlfx
raise RuntimeError("boom at import")
'''

BROKEN_HOOK = '''
import tlfx
from sklearn.naive_bayes import GaussianNB


@tlfx.hookimpl
def register_heads(register):
    register("half_registered", GaussianNB, description="registered just before the hook fails")
    raise KeyError("missing config")


@tlfx.hookimpl
def register_datasets(register):
    raise ValueError("no data here")
'''

UNDECORATED = '''
def register_backbones(register):
    register("never_seen", None)
'''

MISSPELLED = '''
import tlfx


@tlfx.hookimpl
def register_backbone(register):
    pass
'''

CLASH = '''
import click
import tlfx


@click.command(name="extract")
def fake_extract():
    """Not the real extract."""
    click.echo("hijacked")


@tlfx.hookimpl
def register_commands(cli):
    cli.add_command(fake_extract)
'''


def write(directory: Path, **files) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return directory


@pytest.fixture
def fresh_manager():
    """Restore the process-wide plugin manager after a test that loads a plugins directory in-process."""
    yield
    reset_plugin_manager()


def record(pm, name):
    return next(r for r in pm.records if r.name == name)


# ---------------------------------------------------------------------------------------- in-process (fast)


def test_broken_plugins_are_recorded_and_the_rest_keeps_working(tmp_path):
    d = write(tmp_path / "p", good=GOOD, broken_import=BROKEN_IMPORT, broken_hook=BROKEN_HOOK,
              undecorated=UNDECORATED, misspelled=MISSPELLED, _helper="raise SystemExit('helpers are not plugins')")
    pm = PluginManager([str(d)])
    assert "RuntimeError: boom at import" in record(pm, "broken_import").error
    assert "broken_import.py:3" in record(pm, "broken_import").error  # where, for the author
    assert "_helper" not in [r.name for r in pm.records]

    heads = pm.registry("head")
    assert "half_registered" not in heads  # the failed hook's partial registrations are rolled back
    assert "register_heads failed: KeyError" in record(pm, "broken_hook").error
    datasets = pm.registry("dataset")
    assert "digits" in datasets and "imagefolder" in datasets  # the kind still works with the other plugins
    assert "register_datasets failed: ValueError: no data here" in record(pm, "broken_hook").error
    assert pm.registry("backbone").get("mean_colour").plugin == "good"
    assert record(pm, "good").kinds == ["backbone"] and record(pm, "good").error is None

    assert "register_backbones is not decorated with @tlfx.hookimpl" in record(pm, "undecorated").error
    assert "unknown hook 'register_backbone'" in record(pm, "misspelled").error
    assert "never_seen" not in pm.registry("backbone")


def test_plugins_dir_helpers_are_importable_not_loaded(tmp_path):
    d = write(tmp_path / "p", _shared='SIZE = 8\nLOADED = []\n', uses_helper='''
        import tlfx
        from torch import nn

        from . import _shared
        from tlfx.backbone import Backbone, Preprocess, WeightsInfo

        _shared.LOADED.append("uses_helper")

        @tlfx.hookimpl
        def register_backbones(register):
            register("helper_sized", lambda weights=None: Backbone("helper_sized", nn.Flatten(),
                     Preprocess(_shared.SIZE, _shared.SIZE), WeightsInfo("none")), description="size from a helper")
        ''')
    pm = PluginManager([str(d)])
    assert [r.name for r in pm.records if r.source.startswith(str(d))] == ["uses_helper"]
    assert record(pm, "uses_helper").error is None
    bb = pm.registry("backbone").get("helper_sized").factory()
    assert bb.preprocess.crop == 8
    import tlfx_local_plugins._shared as shared

    assert shared.LOADED == ["uses_helper"]  # imported once, by the plugin; not run as a plugin itself


def test_invalid_registrations_are_refused_with_the_reason(tmp_path):
    d = write(tmp_path / "p", bad_names='''
        import tlfx

        @tlfx.hookimpl
        def register_datasets(register):
            register("my:data", lambda arg, split=None, root=None: None, description="colon in the name")

        @tlfx.hookimpl
        def register_heads(register):
            register("nb", "not callable", description="x")
        ''')
    pm = PluginManager([str(d)])
    pm.registry("dataset")
    pm.registry("head")
    err = record(pm, "bad_names").error
    assert "dataset name 'my:data' is invalid" in err
    assert "head 'nb': factory 'not callable' is not callable" in err


def test_duplicate_name_is_unusable_alone_with_one_line_naming_both_plugins(tmp_path):
    d = write(tmp_path / "p", dup='''
        import tlfx

        @tlfx.hookimpl
        def register_datasets(register):
            register("digits", lambda arg, split=None, root=None: None, description="a second digits")
        ''')
    pm = PluginManager([str(d)])
    reg = pm.registry("dataset")  # the registry builds: only the clashing name is unusable
    assert "digits" in reg.names() and reg.clash("digits") == ["datasets", "dup"]
    assert reg.get("imagefolder").plugin == "datasets"
    with pytest.raises(DuplicateNameError) as exc:
        reg.get("digits")
    msg = str(exc.value)
    assert "\n" not in msg and "'digits'" in msg and "'datasets'" in msg and "'dup'" in msg
    assert "TLFX_LOAD_PLUGINS=''" in msg  # tlfx's own plugin always loads: leave the other one out
    assert isinstance(exc.value, TlfxError)
    assert "is registered twice" in record(pm, "dup").error and "is registered twice" in record(pm, "datasets").error


def test_unknown_register_keyword_is_a_plugin_error_with_a_suggestion(tmp_path):
    d = write(tmp_path / "p", typo='''
        import tlfx
        from sklearn.naive_bayes import GaussianNB

        @tlfx.hookimpl
        def register_heads(register):
            register("typo_nb", GaussianNB, descripton="misspelled keyword")
        ''')
    pm = PluginManager([str(d)])
    heads = pm.registry("head")
    assert "typo_nb" not in heads  # not stored with a silently ignored keyword
    err = record(pm, "typo").error
    assert "unknown keyword 'descripton'; did you mean 'description'?" in err
    assert "valid: description, param_grid" in err
    with pytest.raises(TlfxError, match="unknown head 'typo_nb'.*plugin 'typo' failed to load: register_heads failed: "
                                        "TypeError: .*unknown keyword 'descripton'.*; it may have provided it"):
        heads.get("typo_nb")


def test_unknown_name_mentions_plugins_that_failed_to_import(tmp_path):
    pm = PluginManager([str(write(tmp_path / "p", broken_import=BROKEN_IMPORT))])
    with pytest.raises(TlfxError, match="unknown backbone 'resnet_mine'; valid choices: .*; plugin 'broken_import' "
                                        "failed to load: RuntimeError: boom at import .*; it may have provided it"):
        pm.registry("backbone").get("resnet_mine")


def test_load_plugins_allow_list_selects_external_plugins(tmp_path, monkeypatch):
    d = write(tmp_path / "p", good=GOOD, broken_import=BROKEN_IMPORT)
    monkeypatch.setenv("TLFX_LOAD_PLUGINS", "")
    pm = PluginManager([str(d)])
    assert record(pm, "good").skipped and record(pm, "broken_import").skipped  # not even imported
    assert "mean_colour" not in pm.registry("backbone")
    assert "pixels" in pm.registry("backbone") and "svm" in pm.registry("head")  # tlfx's own always load
    monkeypatch.setenv("TLFX_LOAD_PLUGINS", "good, other")
    pm = PluginManager([str(d)])
    assert "mean_colour" in pm.registry("backbone") and record(pm, "broken_import").skipped


def test_missing_plugins_dir_is_a_clear_error(tmp_path):
    with pytest.raises(TlfxError, match="plugins directory .*nowhere.* does not exist"):
        PluginManager([str(tmp_path / "nowhere")])


def test_unknown_kind_names_the_valid_ones():
    with pytest.raises(TlfxError, match="valid choices: backbone, dataset, head"):
        tlfx.get_plugin_manager().registry("optimizer")


# ----------------------------------------------------------------------------------------- the real CLI


def test_cli_plugins_dir_lists_broken_plugins_and_other_commands_still_work(tmp_path):
    d = write(tmp_path / "p", good=GOOD, broken_import=BROKEN_IMPORT, broken_hook=BROKEN_HOOK, clash=CLASH)
    out = run_cli("--plugins-dir", d, "plugins", check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()}
    assert "FAILED: RuntimeError: boom at import" in lines["broken_import"]
    assert "register_heads failed: KeyError" in lines["broken_hook"]
    assert "command 'extract' (from tlfx) already exists" in lines["clash"]
    assert "backbone, command" in lines["good"] and str(d / "good.py") in lines["good"]
    assert "efficientnet_lite" in lines and "FAILED" not in lines["efficientnet_lite"]

    # the env var works like the option; a failed register_heads does not break the heads of other plugins,
    # and the clashing plugin did not replace the core extract command
    env = {"TLFX_PLUGINS_DIR": str(d)}
    hello = run_cli("hello-plugin", "tester", env=env, check=True)
    assert hello.stdout.strip() == "hello, tester, from a plugins-dir plugin"
    store = tmp_path / "f.h5"
    res = run_cli("extract", "--backbone", "mean_colour", "--data", "digits", "--limit", "24", "--out", store,
                  "--quiet", "--workers", "0", env=env, check=True)
    assert "extracted 24 images x 12 features" in res.stdout
    assert tlfx.FeatureStore(str(store)).features.shape == (24, 12)


DUP_HEAD = '''
import tlfx
from sklearn.naive_bayes import GaussianNB


@tlfx.hookimpl
def register_heads(register):
    register("shared_nb", GaussianNB, description="naive Bayes from {name}")
'''


def test_cli_clash_makes_only_that_name_unusable_and_says_how_to_pick(tmp_path, digits_stores):
    d = write(tmp_path / "p", dup_backbone='''
        import tlfx

        @tlfx.hookimpl
        def register_backbones(register):
            register("efficientnet_lite0", lambda weights=None: None, description="an impostor")
        ''', alpha=DUP_HEAD.format(name="alpha"), beta=DUP_HEAD.format(name="beta"))
    # the listings work and mark the clash; other names of the same kind stay usable
    listing = run_cli("--plugins-dir", d, "backbones", check=True).stdout
    row = next(line for line in listing.splitlines() if line.startswith("efficientnet_lite0 "))
    assert "CLASH: registered by efficientnet_lite and dup_backbone" in row
    assert any(line.startswith("pixels ") for line in listing.splitlines())
    heads = run_cli("--plugins-dir", d, "heads", check=True).stdout
    assert "CLASH: registered by alpha and beta" in heads and "svm " in heads

    # using the name: one line naming both plugins and the TLFX_LOAD_PLUGINS value that picks each
    res = run_cli("--plugins-dir", d, "fit", "--features", digits_stores[0], "--head", "shared_nb",
                  "--out", tmp_path / "m.tlfx")
    assert res.returncode == 2 and "Traceback" not in res.stderr and not (tmp_path / "m.tlfx").exists()
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1
    assert re.match(r"error: head 'shared_nb' is registered twice: by plugin 'alpha' and by plugin 'beta'; pick one "
                    r"with TLFX_LOAD_PLUGINS=alpha,dup_backbone \(keeps 'alpha'\) or TLFX_LOAD_PLUGINS=beta,"
                    r"dup_backbone \(keeps 'beta'\), or uninstall or rename one of them$", lines[0]), lines[0]
    res = run_cli("--plugins-dir", d, "extract", "--backbone", "efficientnet_lite0", "--data", "digits", "--out",
                  tmp_path / "x.h5")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "tlfx's own plugin 'efficientnet_lite' always loads: leave the other out with TLFX_LOAD_PLUGINS=alpha,beta" \
        in res.stderr

    # following the advice works
    run_cli("--plugins-dir", d, "fit", "--features", digits_stores[0], "--head", "shared_nb", "--out",
            tmp_path / "m.tlfx", env={"TLFX_LOAD_PLUGINS": "beta"}, check=True)
    assert tlfx.load_model(str(tmp_path / "m.tlfx")).meta["head"] == "shared_nb"

    # `tlfx plugins` lists every plugin and marks both sides of each clash
    listing = run_cli("--plugins-dir", d, "plugins", check=True)
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert {"efficientnet_lite", "dup_backbone", "sklearn_heads", "pixels", "alpha", "beta"} <= set(rows)
    assert "backbone 'efficientnet_lite0' is registered twice" in rows["dup_backbone"]
    assert "backbone 'efficientnet_lite0' is registered twice" in rows["efficientnet_lite"]
    assert "FAILED" not in rows["sklearn_heads"]
    skipped = run_cli("--plugins-dir", d, "plugins", env={"TLFX_LOAD_PLUGINS": "beta"}, check=True).stdout
    assert "skipped: not in TLFX_LOAD_PLUGINS" in next(line for line in skipped.splitlines() if line.startswith("alpha"))


def test_cli_trace_plugins_logs_loads_hook_calls_and_registrations(tmp_path):
    d = write(tmp_path / "p", good=GOOD)
    res = run_cli("--plugins-dir", d, "backbones", env={"TLFX_TRACE_PLUGINS": "1"}, check=True)
    log = res.stderr
    assert "tlfx plugins: load plugin 'pixels' from tlfx_plugins.pixels [tlfx " in log
    assert f"tlfx plugins: load plugin 'good' from tlfx_local_plugins.good [{d / 'good.py'}]" in log
    assert "tlfx plugins: call register_backbones of plugin 'good'" in log
    assert "tlfx plugins: good registered backbone 'mean_colour'" in log
    assert "tlfx plugins: good registered command 'hello-plugin'" in log
    assert "tlfx plugins" not in run_cli("--plugins-dir", d, "backbones", check=True).stderr


DOTS = '''
import numpy as np
from PIL import Image

import tlfx
from tlfx.datasets import ImageDataset


class Dots(ImageDataset):
    """A dataset class of its own, defined in a plugins-dir file: workers must unpickle it."""

    def __init__(self, split):
        super().__init__()
        self.spec, self.split = "dots", split
        self.ids = [str(i) for i in range(12)]
        self.labels = np.arange(12, dtype=np.int64) % 2
        self.class_names = ["sparse", "dense"]

    def load(self, i, target=None):
        a = np.zeros((16, 16, 3), np.uint8)
        a[:: 4 - 2 * (i % 2), ::3] = 255
        return Image.fromarray(a)


@tlfx.hookimpl
def register_datasets(register):
    register("dots", lambda arg, split=None, root=None: Dots(split), description="dots", splits=("train",))
'''

SPAWN_EXTRACT = '''
import multiprocessing, sys

if __name__ == "__main__":
    multiprocessing.set_start_method("spawn", force=True)
    from tlfx.extraction import extract
    from tlfx.plugins import reset_plugin_manager

    reset_plugin_manager([sys.argv[1]])
    print(extract("pixels", "dots", sys.argv[2], workers=1).summary())
'''


@pytest.mark.slow  # spawned workers import torch again: ~10 s of CPU
def test_plugins_dir_dataset_class_works_in_spawned_workers(tmp_path):
    """macOS, Windows and Python >= 3.14 start DataLoader workers with spawn/forkserver: they must be able to
    import a dataset class defined in a plugins-dir file (tlfx_local_plugins.<stem>) to unpickle the dataset."""
    import subprocess
    import sys

    d = write(tmp_path / "p", dots=DOTS)
    script = tmp_path / "run.py"
    script.write_text(SPAWN_EXTRACT)
    env = {k: v for k, v in os.environ.items() if k not in ("TLFX_PLUGINS_DIR", "_TLFX_LOCAL_PLUGIN_FILES")}
    proc = subprocess.run([sys.executable, str(script), str(d), str(tmp_path / "o.h5")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "extracted 12 images x 3072 features" in proc.stdout
    st = tlfx.FeatureStore(str(tmp_path / "o.h5"))
    assert st.class_names == ["sparse", "dense"] and list(st.labels) == [0, 1] * 6


# ---------------------------------------------------------------------------- the guide's minimal plugin


def guide_blocks() -> dict[str, str]:
    """Code blocks of docs/plugins.md tagged ``<!-- file: NAME -->`` on the line before the fence."""
    text = GUIDE.read_text()
    return dict(re.findall(r"<!-- file: (\S+) -->\s*\n```(?:python|toml)\n(.*?)```", text, re.S))


def test_guide_minimal_plugin_is_short_and_passes_the_contract_checks(tmp_path, fresh_manager):
    blocks = guide_blocks()
    code = blocks["sides_plugin.py"]
    assert len(code.strip().splitlines()) < 50, "the guide promises a minimal plugin in under 50 lines"
    d = tmp_path / "guide"
    d.mkdir()
    (d / "sides_plugin.py").write_text(code)
    reset_plugin_manager([str(d)])
    rec = record(tlfx.get_plugin_manager(), "sides_plugin")
    assert rec.error is None
    # the guide's own test block, run as written
    test_code = blocks["test_sides_plugin.py"]
    namespace = {}
    exec(compile(test_code, "test_sides_plugin.py", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
    assert len(tests) >= 3
    for t in tests:  # the only fixture the guide's tests use is tmp_path
        args = {"tmp_path": tmp_path / t.__name__} if "tmp_path" in inspect.signature(t).parameters else {}
        for path in args.values():
            path.mkdir()
        t(**args)
    assert rec.kinds == ["backbone", "head", "dataset"]


def test_guide_minimal_plugin_through_the_cli(tmp_path):
    """Loaded from a --plugins-dir by the real CLI, its command runs (extraction with it: the test above)."""
    d = tmp_path / "guide"
    d.mkdir()
    (d / "sides_plugin.py").write_text(guide_blocks()["sides_plugin.py"])
    res = run_cli("--plugins-dir", d, "sides-info", "--n", "3", check=True)
    assert res.stdout.strip() == "6 images, classes: left, right"


def test_guide_pyproject_snippet_declares_the_entry_point():
    import tomllib

    project = tomllib.loads(guide_blocks()["pyproject.toml"])
    assert project["project"]["entry-points"]["tlfx"] == {"sides": "tlfx_sides"}
    assert any(d.startswith("tlfx") for d in project["project"]["dependencies"])


def test_guide_documents_every_hook_with_its_signature():
    from tlfx import hookspecs
    from tlfx.plugins import HOOK_NAMES

    text = GUIDE.read_text()
    assert HOOK_NAMES == ("register_backbones", "register_commands", "register_datasets", "register_heads")
    for name in HOOK_NAMES:
        sig = f"{name}{inspect.signature(getattr(hookspecs, name))}"
        assert f"### `{sig}`" in text, f"docs/plugins.md has no section for {sig}"


def test_first_party_plugins_import_as_tlfx_plugins_from_this_checkout(tmp_path):
    """tlfx's own plugins are the package tlfx_plugins (no top-level "plugins" to collide with another project's),
    taken from the checkout whose tlfx runs, also with only PYTHONPATH pointing at it."""
    import subprocess
    import sys

    code = ("import sys, tlfx.plugins, tlfx_plugins.sklearn_heads as m; print(m.__file__); "
            "print('plugins' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True).stdout.split()
    assert out == [str(ROOT / "plugins" / "sklearn_heads.py"), "False"]
