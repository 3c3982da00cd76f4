"""The fleet's config: [models.<id>] tables inheriting [backend], fleet.models_dir, [fleet], and one model as before."""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from fakes import clean_config_env

from llamad import cli, config
from llamad.config import AUTO, GIB, BackendConfig, Config, ConfigError
from llamad.config.rendering import toml_key

BASE_ENV = {"DATA_DIR": "/data"}


def load(
    toml: str = "", env: dict[str, str] | None = None, options: dict[str, Any] | None = None,
    check_files: bool = False, require_model: bool = True, tmp: Path | None = None,
) -> config.Loaded:
    """Load TOML text (written to a file when given) with BASE_ENV plus ``env``."""
    path = ""
    if toml:
        assert tmp is not None
        path = write(tmp, toml)
    return config.load(path, {**BASE_ENV, **(env or {})}, options, check_files=check_files,
                       require_model=require_model)


def write(tmp: Path, text: str, name: str = "llamad.toml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def error(tmp: Path, toml: str = "", **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(toml, tmp=tmp, **kwargs)
    return str(info.value)


def ggufs(root: Path, *names: str) -> Path:
    """Empty files (and their directories) under root: enough for a scan."""
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()
    return root


def fleet_dir(tmp: Path, *names: str) -> str:
    return f'[fleet]\nmodels_dir = "{ggufs(tmp / "gguf", *names)}"\n'


# --- one model, as before --------------------------------------------------------------------


def test_no_models_table_is_one_model_with_todays_id() -> None:
    loaded = load(env={"MODEL_PATH": "/models/q4.gguf", "IDLE_TIMEOUT": "90"})
    cfg = loaded.config
    assert cfg.single_model is True
    assert list(cfg.models) == ["q4"]
    model = cfg.models["q4"]
    assert model.backend is cfg.backend and model.backend.model_id == "q4"
    assert (model.aliases, model.memory, model.idle_timeout, model.pinned, model.preload) == ((), AUTO, 90.0,
                                                                                              False, True)
    assert cfg.default_model == "q4" and cfg.names == {"q4": "q4"}
    assert not any(key.startswith("models.") for key in loaded.sources)


def test_single_model_ids_without_a_model_file(tmp_path: Path) -> None:
    assert list(load(require_model=False).config.models) == ["default"]
    external = load(options={"backend.kind": "external", "backend.url": "http://10.0.0.5:8080"}).config
    assert list(external.models) == ["10.0.0.5"]
    assert external.models["10.0.0.5"].backend.model_id == "10.0.0.5" and external.backend.model_id == ""
    assert external.models["10.0.0.5"].memory == 0
    poller = load(options={"backend.kind": "none", "scale_from_zero.enabled": "true"}).config
    assert poller.single_model and poller.models == {} and poller.default_model == ""


def test_single_model_start_lazy_is_not_preloaded() -> None:
    model = load(env={"MODEL_PATH": "/m/a.gguf"}, options={"backend.start": "lazy"}).config.models["a"]
    assert model.preload is False


def test_a_config_built_in_code_has_its_model() -> None:
    cfg = Config(backend=BackendConfig(model="/m/x.gguf"))
    assert list(cfg.models) == ["x"]
    assert list(dataclasses.replace(cfg, backend=BackendConfig(model="/m/y.gguf")).models) == ["y"]


def test_single_model_render_has_no_model_tables() -> None:
    text = config.render(load(env={"MODEL_PATH": "/m/q4.gguf"}))
    assert not any(line.startswith("[models") for line in text.splitlines())
    assert '# one model, from [backend]: id "q4"' in text
    assert tomllib.loads(text)["fleet"] == {"models_dir": "", "default": "", "memory_budget": "auto",
                                            "memory_reserve": GIB, "max_loaded": 0, "min_resident": 5.0,
                                            "swap_quantum": 10.0, "kv_cache_disk": 8 * GIB, "kv_save_timeout": 5.0}


def test_set_of_a_model_key_without_a_fleet_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"MODEL_PATH": "/m/a.gguf"}, options={"models.a.context": "8192"})
    assert str(info.value).startswith("models.a: no such model: this config has no [models] tables")


# --- inheritance and overrides ---------------------------------------------------------------


def test_models_inherit_backend_from_file_and_env(tmp_path: Path) -> None:
    loaded = load('[backend]\ncontext = 8192\nextra_args = ["--jinja"]\n[models.a]\nmodel = "/m/a.gguf"\n'
                  '[models.b]\nmodel = "/m/b.gguf"\nparallel = 2\n',
                  env={"NGL": "10", "THREADS": "6"}, tmp=tmp_path)
    cfg = loaded.config
    path = str(tmp_path / "llamad.toml")
    assert cfg.single_model is False and list(cfg.models) == ["a", "b"]
    for model in cfg.models.values():
        assert (model.backend.context, model.backend.gpu_layers, model.backend.threads) == (8192, 10, 6)
        assert model.backend.extra_args == ("--jinja",)
    assert cfg.models["b"].backend.parallel == 2 and cfg.models["a"].backend.parallel == 4
    assert loaded.sources["models.a.gpu_layers"] == "inherited from [backend] (env NGL)"
    assert loaded.sources["models.a.context"] == f"inherited from [backend] ({path})"
    assert loaded.sources["models.a.parallel"] == "inherited from [backend] (default)"
    assert loaded.sources["models.b.parallel"] == path


def test_model_keys_win_over_backend_from_env(tmp_path: Path) -> None:
    loaded = load('[models.a]\nmodel = "/m/a.gguf"\ngpu_layers = 20\ncontext = 16384\n',
                  env={"NGL": "10", "CTX": "2048"}, tmp=tmp_path)
    backend = loaded.config.models["a"].backend
    assert (backend.gpu_layers, backend.context) == (20, 16384)
    assert loaded.config.backend.gpu_layers == 10


def test_model_env_is_merged_over_backend_env(tmp_path: Path) -> None:
    loaded = load('[backend]\nenv = {A = "1", B = "2"}\n[models.a]\nmodel = "/m/a.gguf"\nenv = {B = "3", C = "4"}\n',
                  tmp=tmp_path)
    assert loaded.config.models["a"].backend.env == {"A": "1", "B": "3", "C": "4"}
    assert loaded.sources["models.a.env"].endswith(", over [backend] env")


def test_every_backend_key_can_be_set_per_model(tmp_path: Path) -> None:
    text = ('[models.a]\nkind = "llama-cpp-python"\ncommand = "/opt/py"\nmodel = "/m/a.gguf"\nmodels_dir = "/g"\n'
            'gpu_layers = 0\ncontext = 1024\nparallel = 1\nthreads = 3\nembeddings = true\nextra_args = ["-x"]\n'
            'env = {X = "1"}\nstart = "eager"\nready_timeout = 60\n')
    backend = load(text, tmp=tmp_path).config.models["a"].backend
    assert backend == BackendConfig(kind="llama-cpp-python", command="/opt/py", model="/m/a.gguf", models_dir="/g",
                                    gpu_layers=0, context=1024, parallel=1, threads=3, embeddings=True,
                                    extra_args=("-x",), env={"X": "1"}, start="eager", ready_timeout=60.0, name="a")


def test_model_path_resolves_like_backend_model(tmp_path: Path) -> None:
    text = ('[models.a]\nmodel = "a.gguf"\n[models.b]\nmodel = "/srv/b.gguf"\n'
            '[models.c]\nmodel = "c.gguf"\nmodels_dir = "/other"\n')
    models = load(text, env={"MODELS_DIR": "/gguf"}, tmp=tmp_path).config.models
    assert [m.backend.model for m in models.values()] == ["/gguf/a.gguf", "/srv/b.gguf", "/other/c.gguf"]


def test_model_inherits_backend_model_when_it_names_none(tmp_path: Path) -> None:
    loaded = load("[models.small]\ncontext = 2048\n", env={"MODEL_PATH": "/m/q.gguf"}, tmp=tmp_path)
    model = loaded.config.models["small"]
    assert model.backend.model == "/m/q.gguf" and model.backend.model_id == "small"
    assert loaded.sources["models.small.model"] == "inherited from [backend] (env MODEL_PATH)"
    assert loaded.warnings == ()


def test_backend_model_that_no_model_uses_is_a_warning(tmp_path: Path) -> None:
    loaded = load('[models.a]\nmodel = "/m/a.gguf"\n', env={"MODEL_PATH": "/m/q.gguf"}, tmp=tmp_path)
    assert loaded.warnings == ("backend.model (/m/q.gguf, from env MODEL_PATH) is not served: in a fleet it is "
                               "only the model of a [models.<id>] table that names none",)


def test_llama_server_bin_is_not_inherited_by_a_python_model(tmp_path: Path) -> None:
    loaded = load('[models.py]\nmodel = "/m/a.gguf"\nkind = "llama-cpp-python"\n[models.ls]\nmodel = "/m/b.gguf"\n',
                  env={"LLAMA_SERVER_BIN": "/opt/llama-server"}, tmp=tmp_path)
    assert loaded.config.models["py"].backend.command == "llama-server"
    assert loaded.config.models["ls"].backend.command == "/opt/llama-server"


# --- the model's own keys --------------------------------------------------------------------


def test_model_only_key_defaults(tmp_path: Path) -> None:
    loaded = load('[models.a]\nmodel = "/m/a.gguf"\n', env={"IDLE_TIMEOUT": "90"}, tmp=tmp_path)
    model = loaded.config.models["a"]
    assert (model.aliases, model.memory, model.idle_timeout, model.pinned, model.preload) == ((), AUTO, 90.0,
                                                                                              False, False)
    assert model.backend.start == "lazy" and model.mmproj == "" and model.scanned is False
    assert loaded.sources["models.a.idle_timeout"] == "inherited from idle.timeout (env IDLE_TIMEOUT)"
    assert loaded.sources["models.a.memory"] == "default"
    assert loaded.config.default_model == ""  # a fleet has a default only when fleet.default names one


def test_model_only_keys(tmp_path: Path) -> None:
    text = ('[models.a]\nmodel = "/m/a.gguf"\naliases = ["x", "Qwen/Qwen2.5-7B-Instruct"]\nmemory = 8589934592\n'
            'idle_timeout = 300\npinned = true\npreload = true\n'
            '[models.b]\nmodel = "/m/b.gguf"\nmemory = "512MiB"\n[models.c]\nmodel = "/m/c.gguf"\nmemory = "2GB"\n')
    models = load(text, tmp=tmp_path).config.models
    a = models["a"]
    assert (a.aliases, a.memory, a.idle_timeout, a.pinned, a.preload) == (
        ("x", "Qwen/Qwen2.5-7B-Instruct"), 8 * GIB, 300.0, True, True)
    assert a.backend.start == "eager" and a.names == ("a", "x", "Qwen/Qwen2.5-7B-Instruct")
    assert (models["b"].memory, models["c"].memory) == (512 << 20, 2_000_000_000)


@pytest.mark.parametrize(
    "backend, table, preload",
    [
        ("", 'start = "eager"\n', True),
        ("", 'start = "lazy"\n', False),
        ('[backend]\nstart = "eager"\n', "", True),
        ('[backend]\nstart = "eager"\n', "preload = false\n", False),
        ("", "", False),
    ],
)
def test_preload_and_start_agree(tmp_path: Path, backend: str, table: str, preload: bool) -> None:
    model = load(f'{backend}[models.a]\nmodel = "/m/a.gguf"\n{table}', tmp=tmp_path).config.models["a"]
    assert model.preload is preload
    assert model.backend.start == ("eager" if preload else "lazy")


def test_preload_contradicting_start_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "llamad.toml"
    assert error(tmp_path, '[models.a]\nmodel = "/m/a.gguf"\nstart = "eager"\npreload = false\n') == (
        f"models.a.preload: preload = false contradicts start = 'eager' (set one of them) (from {path})")


@pytest.mark.parametrize("options, preload", [({"models.a.preload": "false"}, False),
                                              ({"models.a.start": "lazy"}, False)])
def test_an_option_wins_over_the_file_for_preload_and_start(
    tmp_path: Path, options: dict[str, str], preload: bool
) -> None:
    text = '[models.a]\nmodel = "/m/a.gguf"\nstart = "eager"\npreload = true\n'
    model = load(text, tmp=tmp_path, options=options).config.models["a"]
    assert (model.preload, model.backend.start) == (preload, "lazy")


@pytest.mark.parametrize("model_id", ["qwen2.5:7b", "llama3.1:8b-instruct-q4_K_M", "a_b-c", "7b"])
def test_ids_with_colons_and_dots(tmp_path: Path, model_id: str) -> None:
    loaded = load(f'[models."{model_id}"]\nmodel = "/m/a.gguf"\n', tmp=tmp_path)
    assert list(loaded.config.models) == [model_id]
    assert loaded.config.models[model_id].backend.model_id == model_id
    assert tomllib.loads(config.render(loaded))["models"][model_id]["model"] == "/m/a.gguf"


def test_external_model(tmp_path: Path) -> None:
    model = load('[models.remote]\nkind = "external"\nurl = "http://10.0.0.5:8080"\n', tmp=tmp_path,
                 check_files=True).config.models["remote"]
    assert (model.backend.kind, model.backend.url, model.memory) == ("external", "http://10.0.0.5:8080", 0)


# --- fleet.models_dir ----------------------------------------------------------------------------


def test_models_dir_scan(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "a.gguf", "B.GGUF", "mmproj-a-f16.gguf", "notes.txt", ".hidden.gguf",
                     "vision/gemma-3-4b-Q4.gguf", "vision/mmproj-gemma-3-4b-f16.gguf",
                     "big/big-Q4-00001-of-00003.gguf", "big/big-Q4-00002-of-00003.gguf",
                     "big/big-Q4-00003-of-00003.gguf", "split-00001-of-00002.gguf", "split-00002-of-00002.gguf",
                     "empty/readme.md")
    loaded = load(text, tmp=tmp_path)
    gguf = tmp_path / "gguf"
    models = loaded.config.models
    assert list(models) == ["B", "a", "big", "split", "vision"]
    assert models["a"].backend.model == str(gguf / "a.gguf")
    assert models["B"].backend.model == str(gguf / "B.GGUF")
    assert models["big"].backend.model == str(gguf / "big" / "big-Q4-00001-of-00003.gguf")
    assert models["split"].backend.model == str(gguf / "split-00001-of-00002.gguf")
    vision = models["vision"]
    assert vision.backend.model == str(gguf / "vision" / "gemma-3-4b-Q4.gguf")
    mmproj = str(gguf / "vision" / "mmproj-gemma-3-4b-f16.gguf")
    assert vision.backend.extra_args == ("--mmproj", mmproj) and vision.mmproj == mmproj
    assert all(m.scanned and m.backend.start == "lazy" for m in models.values())
    assert loaded.sources["models.a.model"] == "scanned from fleet.models_dir"
    assert loaded.sources["models.vision.extra_args"] == (
        "inherited from [backend] (default), --mmproj scanned from fleet.models_dir")
    assert loaded.warnings == ("fleet.models_dir: empty/ holds no model file; skipped",)


def test_scanned_models_inherit_backend(tmp_path: Path) -> None:
    text = '[backend]\ncontext = 8192\nextra_args = ["--jinja"]\n' + fleet_dir(tmp_path, "v/m.gguf", "v/mmproj.gguf")
    model = load(text, env={"NGL": "12"}, tmp=tmp_path).config.models["v"]
    assert (model.backend.context, model.backend.gpu_layers) == (8192, 12)
    assert model.backend.extra_args == ("--jinja", "--mmproj", str(tmp_path / "gguf" / "v" / "mmproj.gguf"))


def test_table_overrides_a_scanned_model(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "a.gguf", "z.gguf", "v/m.gguf", "v/mmproj.gguf") + (
        '[models.z]\ncontext = 16384\naliases = ["zed"]\n[models.v]\nextra_args = ["--jinja"]\n'
        '[models.own]\nmodel = "/m/own.gguf"\n')
    loaded = load(text, tmp=tmp_path)
    models = loaded.config.models
    assert list(models) == ["z", "v", "own", "a"]
    assert models["z"].backend.model == str(tmp_path / "gguf" / "z.gguf") and models["z"].scanned
    assert (models["z"].backend.context, models["z"].aliases) == (16384, ("zed",))
    assert models["v"].backend.extra_args == ("--jinja", "--mmproj", str(tmp_path / "gguf" / "v" / "mmproj.gguf"))
    assert models["own"].scanned is False


def test_table_that_names_its_projector_gets_no_second_one(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "v/m.gguf", "v/mmproj.gguf") + '[models.v]\nextra_args = ["--mmproj", "/p.gguf"]\n'
    model = load(text, tmp=tmp_path).config.models["v"]
    assert model.backend.extra_args == ("--mmproj", "/p.gguf") and model.mmproj == "/p.gguf"


def test_file_a_table_runs_is_not_served_again_under_its_name(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "Qwen2.5-7B-Q4.gguf", "other.gguf") + (
        f'[models."qwen2.5:7b"]\nmodel = "{tmp_path / "gguf" / "Qwen2.5-7B-Q4.gguf"}"\n')
    assert list(load(text, tmp=tmp_path).config.models) == ["qwen2.5:7b", "other"]


def test_scanned_file_with_an_unusable_id_is_skipped_with_a_warning(tmp_path: Path) -> None:
    loaded = load(fleet_dir(tmp_path, "a.gguf", "my model.gguf"), tmp=tmp_path)
    assert list(loaded.config.models) == ["a"]
    assert loaded.warnings[0].startswith("fleet.models_dir: my model.gguf skipped: a model id is letters")


def test_directory_with_two_models_is_an_error_unless_its_table_names_one(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "q/q-Q4.gguf", "q/q-Q8.gguf")
    assert error(tmp_path, text) == (
        "fleet.models_dir: q/ holds more than one model (q-Q4.gguf, q-Q8.gguf): set model in [models.q], or keep one "
        f"(from {tmp_path / 'llamad.toml'})")
    chosen = load(text + f'[models.q]\nmodel = "{tmp_path / "gguf" / "q" / "q-Q8.gguf"}"\n', tmp=tmp_path)
    assert chosen.config.models["q"].backend.model.endswith("q-Q8.gguf")


def test_directory_with_two_projectors_is_an_error(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "v/m.gguf", "v/mmproj-f16.gguf", "v/mmproj-q8.gguf")
    assert error(tmp_path, text).startswith("fleet.models_dir: v/ holds more than one mmproj file")


def test_two_models_with_one_name_is_an_error(tmp_path: Path) -> None:
    message = error(tmp_path, fleet_dir(tmp_path, "x.gguf", "x/x.gguf"))
    assert message == (f"fleet.models_dir: two models named 'x' in {tmp_path / 'gguf'}: x/ and x.gguf "
                       f"(from {tmp_path / 'llamad.toml'})")


def test_models_dir_that_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "file").touch()
    for directory in (tmp_path / "absent", tmp_path / "file"):
        text = f'[fleet]\nmodels_dir = "{directory}"\n'
        assert error(tmp_path, text, check_files=True) == (
            f"fleet.models_dir: not a directory: {directory} (from {tmp_path / 'llamad.toml'})")
    loaded = load(f'[fleet]\nmodels_dir = "{tmp_path / "absent"}"\n[models.a]\nmodel = "/m/a.gguf"\n', tmp=tmp_path)
    assert list(loaded.config.models) == ["a"]
    assert loaded.warnings == (f"fleet.models_dir: {tmp_path / 'absent'} is not a directory here; its models are "
                               "left out",)


def test_models_dir_with_no_models(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "notes.txt")
    assert error(tmp_path, text).startswith(f"fleet.models_dir: no models in {tmp_path / 'gguf'} (a *.gguf file")
    loaded = load(text, tmp=tmp_path, require_model=False)
    assert loaded.config.models == {} and not loaded.config.single_model
    assert str(config.missing_model(loaded)).startswith("fleet.models_dir: no models in ")


def test_scanned_model_cannot_be_external(tmp_path: Path) -> None:
    text = fleet_dir(tmp_path, "a.gguf") + '[models.a]\nkind = "external"\nurl = "http://h:1"\n'
    assert error(tmp_path, text) == (
        f"models.a.kind: a model of fleet.models_dir runs its file; kind 'external' runs none "
        f"(from {tmp_path / 'llamad.toml'})")


# --- errors name the key ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, message",
    [
        ('context = "big"', "models.qwen.context: expected an integer, got 'big'"),
        ("pinned = 1", "models.qwen.pinned: expected a boolean, got 1"),
        ("aliases = [1]", "models.qwen.aliases: expected a list of strings, got [1]"),
        ('aliases = "q"', "models.qwen.aliases: expected a list of strings, got 'q'"),
        ('memory = "lots"',
         "models.qwen.memory: expected a size in bytes (an integer, or a string like \"8GiB\") or \"auto\", "
         "got 'lots'"),
        ("memory = true", "models.qwen.memory: expected a size in bytes (an integer, or a string like \"8GiB\") or "
                          "\"auto\", got True"),
        ('idle_timeout = "5"', "models.qwen.idle_timeout: expected a number, got '5'"),
        ("env = {A = 1}", "models.qwen.env: expected a table of strings, got {'A': 1}"),
        ("bogus = 1", "models.qwen.bogus: unknown key"),
        ("name = 'x'", "models.qwen.name: unknown key"),
        ('kind = "vllm"',
         "models.qwen.kind: unknown value 'vllm' (expected one of: llama-server, llama-cpp-python, external)"),
        ('kind = "none"',
         "models.qwen.kind: unknown value 'none' (expected one of: llama-server, llama-cpp-python, external)"),
        ('start = "soon"', "models.qwen.start: unknown value 'soon' (expected one of: eager, lazy)"),
        ("parallel = 0", "models.qwen.parallel: must be >= 1, got 0"),
        ("gpu_layers = -2", "models.qwen.gpu_layers: must be >= -1, got -2"),
        ("ready_timeout = 0", "models.qwen.ready_timeout: must be > 0, got 0.0"),
        ("context = -1", "models.qwen.context: must be >= 0, got -1"),
        ("memory = -1", "models.qwen.memory: must be >= 0, got -1"),
        ("idle_timeout = -1", "models.qwen.idle_timeout: must be >= 0, got -1.0"),
        ("idle_timeout = nan", "models.qwen.idle_timeout: must be a finite number, got nan"),
        ('env = {"A=B" = "x"}', "models.qwen.env: bad variable name 'A=B'"),
        ('aliases = ["my model"]', "models.qwen.aliases: 'my model' is no usable name (no spaces, commas or control "
                                   "characters)"),
        ('kind = "external"', "models.qwen.url: kind 'external' needs an http:// URL, got ''"),
        ('kind = "external"\nurl = "https://h"',
         "models.qwen.url: kind 'external' needs an http:// URL, got 'https://h'"),
    ],
)
def test_bad_model_key(tmp_path: Path, table: str, message: str) -> None:
    # A default value (url = "") has no "(from ...)".
    expected = message if message.endswith("got ''") else f"{message} (from {tmp_path / 'llamad.toml'})"
    assert error(tmp_path, f'[models.qwen]\nmodel = "/m/q.gguf"\n{table}\n') == expected


def test_bad_value_inherited_from_backend_names_the_backend_key(tmp_path: Path) -> None:
    assert error(tmp_path, '[models.a]\nmodel = "/m/a.gguf"\n', env={"PARALLEL": "0"}) == (
        "backend.parallel: must be >= 1, got 0 (from env PARALLEL)")


@pytest.mark.parametrize(
    "text, message",
    [
        ('[models."bad id"]\nmodel = "/m/a.gguf"\n',
         "models.bad id: a model id is letters, digits and . _ : - (starting with a letter or digit)"),
        ('[models."-x"]\nmodel = "/m/a.gguf"\n',
         "models.-x: a model id is letters, digits and . _ : - (starting with a letter or digit)"),
        ('[models.qwen2.5]\nmodel = "/m/a.gguf"\n',
         'models.qwen2.5: unknown key (an id with a dot is quoted: [models."qwen2.5"])'),
        ("[models]\ncontext = 8192\n",
         "models.context: expected a [models.context] table, got 8192 (a model's keys go in its own [models.<id>] "
         "table)"),
        ("models = 3\n", "models: expected a [models] table, got 3"),
        ("[models]\n", "models: the [models] table holds no model: add [models.<id>] tables, or set fleet.models_dir"),
    ],
)
def test_bad_models_table(tmp_path: Path, text: str, message: str) -> None:
    assert error(tmp_path, text) == f"{message} (from {tmp_path / 'llamad.toml'})"


def test_models_with_backend_kind_none_are_refused(tmp_path: Path) -> None:
    text = '[backend]\nkind = "none"\n[scale_from_zero]\nenabled = true\n'
    expected = (f"backend.kind: 'none' runs no model, but the config defines some ([models] or fleet.models_dir): "
                f"remove them, or pick a kind that runs them (from {tmp_path / 'llamad.toml'})")
    assert error(tmp_path, text + '[models.a]\nmodel = "/m/a.gguf"\n') == expected
    assert error(tmp_path, text + fleet_dir(tmp_path, "a.gguf")) == expected


def test_model_without_a_model_file(tmp_path: Path) -> None:
    assert error(tmp_path, "[models.a]\ncontext = 2048\n") == "models.a.model: no model file (set model in [models.a])"


def test_missing_model_file_is_checked_with_check_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    text = f'[models.a]\nmodel = "{missing}"\ncommand = "{sys.executable}"\n'
    assert error(tmp_path, text, check_files=True) == (
        f"models.a.model: model file not found: {missing} (from {tmp_path / 'llamad.toml'})")
    assert load(text, tmp=tmp_path).config.models["a"].backend.model == str(missing)


def test_missing_model_file_inherited_from_the_environment(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    assert error(tmp_path, "[models.a]\ncontext = 2048\n", env={"MODEL_PATH": str(missing)}, check_files=True) == (
        f"models.a.model: model file not found: {missing} (from env MODEL_PATH)")


def test_command_is_checked_per_model(tmp_path: Path) -> None:
    model = ggufs(tmp_path / "m", "a.gguf") / "a.gguf"
    text = f'[models.a]\nmodel = "{model}"\n'
    absent = tmp_path / "no-llama-server"
    assert error(tmp_path, text, env={"LLAMA_SERVER_BIN": str(absent)}, check_files=True) == (
        f"models.a.command: '{absent}' not found or not executable (set LLAMA_SERVER_BIN) (from env LLAMA_SERVER_BIN)")
    assert load(text, env={"LLAMA_SERVER_BIN": sys.executable}, tmp=tmp_path, check_files=True).config.models["a"]


@pytest.mark.parametrize(
    "tables, message",
    [
        ('[models.a]\naliases = ["x"]\n[models.b]\naliases = ["x"]\n', "models.b.aliases: 'x' is already an alias of "
                                                                        "models.a"),
        ('[models.a]\naliases = ["b"]\n[models.b]\n', "models.a.aliases: 'b' is the id of models.b"),
        ('[models.a]\n[models.b]\naliases = ["a"]\n', "models.b.aliases: 'a' is the id of models.a"),
    ],
)
def test_aliases_are_unique_across_ids_and_aliases(tmp_path: Path, tables: str, message: str) -> None:
    assert error(tmp_path, tables, env={"MODEL_PATH": "/m/q.gguf"}) == f"{message} (from {tmp_path / 'llamad.toml'})"


def test_an_alias_may_repeat_its_own_id(tmp_path: Path) -> None:
    cfg = load('[models.a]\naliases = ["a", "x"]\n', env={"MODEL_PATH": "/m/q.gguf"}, tmp=tmp_path).config
    assert cfg.names == {"a": "a", "x": "a"}


# --- [fleet] ------------------------------------------------------------------------------------------


def test_fleet_defaults() -> None:
    fleet = load(env={"MODEL_PATH": "/m/a.gguf"}).config.fleet
    assert fleet == config.FleetConfig("", "", AUTO, GIB, 0, 5.0, 10.0)
    assert fleet.budget(lambda reserve: (10 * GIB - reserve, "measured")) == (9 * GIB, "measured")


def test_fleet_keys(tmp_path: Path) -> None:
    text = ('[fleet]\ndefault = "x"\nmemory_budget = "70GiB"\nmemory_reserve = "512MiB"\nmax_loaded = 3\n'
            'min_resident = 10\n[models.a]\nmodel = "/m/a.gguf"\naliases = ["x"]\n')
    cfg = load(text, tmp=tmp_path).config
    assert cfg.fleet == config.FleetConfig("", "x", 70 * GIB, 512 << 20, 3, 10.0)
    assert cfg.fleet.budget(lambda reserve: pytest.fail("not auto")) == (70 * GIB, "fleet.memory_budget")
    assert cfg.default_model == "a"


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("fleet.memory_budget", "0", "fleet.memory_budget: must be > 0, got 0"),
        ("fleet.memory_budget", "much", "fleet.memory_budget: expected a size in bytes (an integer, or a string like "
                                        "\"8GiB\") or \"auto\", got 'much'"),
        ("fleet.memory_reserve", "auto", "fleet.memory_reserve: expected a size in bytes (an integer, or a string "
                                         "like \"8GiB\"), got 'auto'"),
        ("fleet.memory_reserve", "-1", "fleet.memory_reserve: must be >= 0, got -1"),
        ("fleet.max_loaded", "-1", "fleet.max_loaded: must be >= 0, got -1"),
        ("fleet.min_resident", "-5", "fleet.min_resident: must be >= 0, got -5.0"),
        ("fleet.default", "ghost", "fleet.default: 'ghost' names no model (ids and aliases: a)"),
    ],
)
def test_bad_fleet_value(option: str, value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"MODEL_PATH": "/m/a.gguf"}, options={option: value})
    assert str(info.value) == f"{message} (from option)"


def test_fleet_default_must_name_an_id_or_alias(tmp_path: Path) -> None:
    text = '[fleet]\ndefault = "zed"\n[models.a]\nmodel = "/m/a.gguf"\n[models.b]\nmodel = "/m/b.gguf"\n'
    assert error(tmp_path, text) == (
        f"fleet.default: 'zed' names no model (ids and aliases: a, b) (from {tmp_path / 'llamad.toml'})")
    assert load(text.replace("zed", "b"), tmp=tmp_path).config.default_model == "b"


def test_max_loaded_leaves_room_for_the_preloaded_models(tmp_path: Path) -> None:
    text = ("[fleet]\nmax_loaded = 1\n[models.a]\nmodel = \"/m/a.gguf\"\npreload = true\n"
            "[models.b]\nmodel = \"/m/b.gguf\"\npreload = true\n")
    assert error(tmp_path, text) == (
        f"fleet.max_loaded: 1 is fewer than the models with preload = true (a, b) (from {tmp_path / 'llamad.toml'})")


# --- --set models.<id>.<key> -----------------------------------------------------------------------


def test_set_a_model_key(tmp_path: Path) -> None:
    text = '[models.x]\nmodel = "/m/x.gguf"\ncontext = 2048\n[models."qwen2.5:7b"]\nmodel = "/m/q.gguf"\n'
    loaded = load(text, tmp=tmp_path, options={"models.x.context": "8192", "models.x.aliases": "a, b",
                                               "models.qwen2.5:7b.memory": "4GiB", "models.x.pinned": "yes",
                                               "models.x.extra_args": "--jinja -fa on"})
    x = loaded.config.models["x"]
    assert (x.backend.context, x.aliases, x.pinned, x.backend.extra_args) == (8192, ("a", "b"), True,
                                                                              ("--jinja", "-fa", "on"))
    assert loaded.config.models["qwen2.5:7b"].memory == 4 * GIB
    assert loaded.sources["models.x.context"] == "option"


def test_set_a_key_of_a_scanned_model(tmp_path: Path) -> None:
    loaded = load(fleet_dir(tmp_path, "a.gguf"), tmp=tmp_path, options={"models.a.context": 8192})
    assert loaded.config.models["a"].backend.context == 8192


@pytest.mark.parametrize(
    "options, message",
    [
        ({"models.y.context": "8192"}, "models.y: no such model (--set changes a model of a [models.<id>] table or of "
                                       "fleet.models_dir) (from option)"),
        ({"models.x.context": "big"}, "models.x.context: expected an integer, got 'big' (from option)"),
        ({"models.x.bogus": "1"}, "models.x.bogus: unknown key (from option)"),
        ({"models.x": "1"}, "models.x: unknown key (from option)"),
        ({"models.x.kind": "vllm"}, "models.x.kind: unknown value 'vllm' (expected one of: llama-server, "
                                    "llama-cpp-python, external) (from option)"),
    ],
)
def test_bad_model_option(tmp_path: Path, options: dict[str, str], message: str) -> None:
    assert error(tmp_path, '[models.x]\nmodel = "/m/x.gguf"\n', options=options) == message


# --- render ------------------------------------------------------------------------------------------


def test_render_shows_every_model_key_with_its_source(tmp_path: Path) -> None:
    text = '[backend]\ncontext = 8192\n' + fleet_dir(tmp_path, "scan.gguf") + (
        '[models."qwen2.5:7b"]\nmodel = "/m/q.gguf"\naliases = ["qwen"]\n')
    loaded = load(text, env={"NGL": "10"}, options={"models.scan.parallel": "2"}, tmp=tmp_path)
    out = config.render(loaded)
    doc = tomllib.loads(out)
    path = tmp_path / "llamad.toml"
    assert set(doc["models"]) == {"qwen2.5:7b", "scan"}
    for model_id in doc["models"]:
        assert set(doc["models"][model_id]) == set(config.MODEL_KEY_TYPES)
    assert doc["models"]["qwen2.5:7b"]["gpu_layers"] == 10 and doc["models"]["scan"]["parallel"] == 2
    assert doc["fleet"]["models_dir"] == str(tmp_path / "gguf")
    lines = out.splitlines()
    assert '[models."qwen2.5:7b"]' in lines and "[models.scan]" in lines
    assert lines.index("[fleet]") < lines.index('[models."qwen2.5:7b"]') < lines.index("[supervisor]")

    def comment(model_id: str, key: str) -> str:
        start = lines.index(f"[models.{toml_key(model_id)}]")
        return next(line for line in lines[start:] if line.startswith(f"{key} = ")).split(" # ", 1)[1]

    assert comment("qwen2.5:7b", "gpu_layers") == "inherited from [backend] (env NGL)"
    assert comment("qwen2.5:7b", "context") == f"inherited from [backend] ({path})"
    assert comment("qwen2.5:7b", "aliases") == str(path)
    assert comment("scan", "model") == "scanned from fleet.models_dir"
    assert comment("scan", "parallel") == "option"
    assert comment("scan", "preload") == "default"


def test_render_of_a_fleet_loads_back_the_same(tmp_path: Path) -> None:
    text = ('[backend]\nenv = {A = "1"}\n' + fleet_dir(tmp_path, "a.gguf", "v/m.gguf", "v/mmproj.gguf") +
            '[models."qwen2.5:7b"]\nmodel = "/m/q.gguf"\nenv = {B = "2"}\npreload = true\n'
            'memory = "1GiB"\n[models.r]\nkind = "external"\nurl = "http://h:1"\n')
    first = load(text, env={"NGL": "5"}, tmp=tmp_path)
    rendered = write(tmp_path, config.render(first), "rendered.toml")
    second = config.load(rendered, {}, check_files=False)
    assert second.values == first.values
    assert second.config.models == first.config.models


def test_check_config_prints_the_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    clean_config_env(tmp_path, monkeypatch)
    monkeypatch.delenv("MODEL_PATH")
    path = write(tmp_path, fleet_dir(tmp_path, "a.gguf", "my model.gguf"))
    code = cli.main(["check-config", "-c", path, "--set", "models.a.context=8192"])
    out, err = capsys.readouterr()
    assert code == 0
    assert tomllib.loads(out)["models"]["a"]["context"] == 8192
    assert err.startswith("warning: fleet.models_dir: my model.gguf skipped")
