"""Bad input costs a clear error and nothing else: for each kind of mistake, the message names it
and the workdir of an existing run (checkpoints, config.json, tokenizer, metrics) is left exactly
as it was (same files, bytes and modification times)."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import runlib as R

from llm_jax.runtime.errors import BadValue, FileError, NotFound
from llm_jax.training import loop


def _config(corpus, **over):
    """configs/default.py:tiny on a local text file with a character vocabulary, plus dotted overrides."""
    base = {
        "data.source": "text",
        "data.path": corpus,
        "data.tokenizer": "char",
        "train.num_steps": 2,
        "train.checkpoint_every": 1,
        "train.log_every": 1,
        "train.eval_every": 2,
        "train.eval_steps": 1,
        "train.sample_tokens": 0,
    }
    return R.tiny_config({**base, **over})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny run (checkpoints 1 and 2) and its corpus."""
    os.environ.setdefault("LLM_JAX_CPU_PEAK_FLOPS", "1e11")
    root = tmp_path_factory.mktemp("bad_input")
    corpus = R.write_corpus(str(root / "corpus.txt"))
    wd = str(root / "run")
    loop.train_and_evaluate(_config(corpus), wd)
    assert R.finished_steps(wd) == [1, 2]
    return {"workdir": wd, "corpus": corpus, "root": root}


@pytest.fixture
def workdir(run, tmp_path):
    """A private copy of the finished run (copy2 keeps modification times)."""
    wd = str(tmp_path / "run")
    shutil.copytree(run["workdir"], wd, copy_function=shutil.copy2)
    return wd


def _refused(run, workdir, match, error=BadValue, **over):
    """Runs with `over`; asserts the error message and that `workdir` did not change at all."""
    before = R.snapshot(workdir)
    with pytest.raises(error, match=match):
        loop.train_and_evaluate(_config(run["corpus"], **over), workdir)
    assert R.snapshot(workdir) == before, "the existing run must be untouched"


def test_unknown_config_key_in_a_config_file(run, workdir):
    c = _config(run["corpus"])
    c.train.chekpoint_every = 5  # a config file's typo: ConfigDicts accept new keys until locked
    before = R.snapshot(workdir)
    with pytest.raises(
        BadValue, match=r"config\.train\.chekpoint_every \(did you mean config\.train\.checkpoint_every\?\)"
    ):
        loop.train_and_evaluate(c, workdir)
    assert R.snapshot(workdir) == before


def test_unknown_config_key_on_the_command_line(run, workdir):
    before = R.snapshot(workdir)
    cmd = [
        sys.executable,
        "-m",
        "llm_jax.main",
        "--config=configs/default.py:tiny",
        f"--workdir={workdir}",
        "--config.train.num_stesp=3",
    ]
    p = subprocess.run(cmd, cwd=R.REPO, env=R.env(8), capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "num_stesp" in p.stderr, p.stderr[-2000:]
    assert R.snapshot(workdir) == before


def test_bad_train_values(run, workdir):
    _refused(run, workdir, r"config\.train\.on_nan='ignore': use 'stop' or 'skip'", **{"train.on_nan": "ignore"})
    _refused(run, workdir, r"config\.train\.log_every=0 must be positive", **{"train.log_every": 0})


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("data.val_fraction", 1.5, r"config\.data\.val_fraction=1\.5 must be in \(0, 1\)"),
        ("data.val_fraction", 0.0, r"config\.data\.val_fraction=0\.0 must be in \(0, 1\)"),
        ("data.seq_len", 0, r"config\.data\.seq_len=0 must be positive; the default is 128"),
        ("data.prepare_shard_mb", 1e-9, r"prepare_shard_mb=1e-09 must be in \[0\.01, 4096\]"),
        ("data.prepare_shard_mb", 1e6, r"prepare_shard_mb=1000000\.0 must be in \[0\.01, 4096\]"),
        ("data.max_chars", -5, r"config\.data\.max_chars=-5 must be >= 0"),
        ("optim.lr", 0.0, r"config\.optim\.lr=0\.0 must be positive; the default is 0\.001"),
        ("optim.b2", 1.0, r"config\.optim\.b2=1\.0 must be in \[0, 1\)"),
        ("optim.min_lr_ratio", -0.5, r"config\.optim\.min_lr_ratio=-0\.5 must be in \[0, 1\]"),
        ("optim.warmup_steps", -1, r"config\.optim\.warmup_steps=-1 must be >= 0"),
        ("train.eval_batch_size", -8, r"config\.train\.eval_batch_size=-8 must be >= 0"),
        ("decode.beam_size", 0, r"config\.decode\.beam_size=0 must be positive"),
        ("model.dropout_rate", 1.5, r"dropout_rate=1\.5 must be in \[0, 1\)"),
    ],
)
def test_bad_values_are_refused_before_any_data_is_prepared(run, workdir, tmp_path, key, value, match):
    """Each refused before the data is prepared: the workdir and the prepared-data cache unchanged."""
    cache = tmp_path / "cache"
    cache.mkdir()
    before = R.snapshot(str(cache))
    _refused(run, workdir, match, **{key: value, "data.cache_dir": str(cache)})
    assert R.snapshot(str(cache)) == before, "the prepared-data cache must be untouched"


def test_mesh_that_does_not_divide_the_devices(run, workdir):
    _refused(run, workdir, r"needs 3 devices but 8 are available", **{"mesh.data": 3})
    _refused(run, workdir, r"fixed axes multiply to 3, which does not divide the 8", **{"mesh.fsdp": 3})


def test_batch_not_divisible_by_data_parallel_size(run, workdir):
    _refused(run, workdir, r"batch_size=12 is not divisible by data\*fsdp\*expert=8", **{"train.batch_size": 12})


def test_empty_corpus(run, workdir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\n")
    _refused(run, workdir, r"empty.txt' is empty", **{"data.path": str(empty)})


def test_non_utf8_corpus(run, workdir, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1") * 100)
    _refused(run, workdir, r"latin1.txt' is not UTF-8 text \(bad byte at offset 3\)", **{"data.path": str(latin1)})


def test_missing_or_unreadable_data_path(run, workdir, tmp_path):
    _refused(run, workdir, r"nope.txt' does not exist", NotFound, **{"data.path": str(tmp_path / "nope.txt")})
    _refused(run, workdir, r"is not a file", NotFound, **{"data.path": str(tmp_path)})
    if os.geteuid() != 0:  # root reads files whatever their mode
        locked = tmp_path / "locked.txt"
        locked.write_text("some text\n" * 100)
        locked.chmod(0)
        _refused(run, workdir, r"cannot be read", FileError, **{"data.path": str(locked)})


def test_seq_len_beyond_the_position_table(run, workdir):
    _refused(
        run,
        workdir,
        r"seq_len=100 is longer than the model's position table config\.model\.max_len=64",
        **{"data.seq_len": 100},
    )


def test_tokenizer_that_does_not_match_the_checkpoint(run, workdir, tmp_path):
    # Another tokenizer kind than the run's.
    _refused(
        run,
        workdir,
        r"holds the 'char' tokenizer this run was trained with, but config\.data\.tokenizer='byte'",
        **{"data.tokenizer": "byte"},
    )
    # The run's tokenizer replaced by a bigger vocabulary: the embedding no longer fits.
    meta_path = os.path.join(workdir, "tokenizer", "llm_jax_tokenizer.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta["chars"] += "".join(chr(0x4E00 + i) for i in range(100))
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    _refused(
        run,
        workdir,
        r"params/embed/embedding is \(128, 32\) in the checkpoint but \(256, 32\) here.* "
        r"The vocabulary size differs",
    )
    # The tokenizer deleted and rebuilt from other text: same vocabulary size, other characters.
    shutil.rmtree(os.path.join(workdir, "tokenizer"))
    other = tmp_path / "other.txt"
    other.write_text(open(run["corpus"]).read().swapcase().replace("e", "\u00e9"))
    _refused(
        run,
        workdir,
        r"checkpoint \S+/2 was trained with tokenizer .*'kind': 'char'.* but this run's tokenizer "
        r"\(built from config\.data\) is",
        **{"data.path": str(other)},
    )


def test_workdir_holding_a_different_model(run, workdir):
    _refused(
        run,
        workdir,
        r"holds the run of a different model: model\.num_layers is 2 there but 3 now.*"
        r"--config\.train\.overwrite=True",
        **{"model.num_layers": 3},
    )
    # Told to start over: the old run is moved aside intact, and a new one starts in its place.
    before = R.snapshot(workdir)
    last = loop.train_and_evaluate(
        _config(run["corpus"], **{"model.num_layers": 3, "train.overwrite": True, "train.num_steps": 1}), workdir
    )
    assert last["step"] == 1
    (aside,) = glob.glob(workdir + ".old-*")
    assert R.snapshot(aside) == before
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["num_layers"] == 3
    assert R.finished_steps(workdir) == [1]


def test_workdir_whose_config_json_cannot_be_read_is_not_moved_aside(run, workdir):
    os.remove(os.path.join(workdir, "config.json"))
    os.mkdir(os.path.join(workdir, "config.json"))  # an OSError on reading it (as a permission error would be)
    _refused(run, workdir, r"config.json cannot be read \(Is a directory\); make it readable or use another", FileError,
             **{"train.overwrite": True})  # fmt: skip
    assert not glob.glob(workdir + ".old-*")


# ----------------------------------------------------------------------------------------------
# Command lines: an expected error is one line on stderr, `<tool>: error: ...`, without a traceback


def _tiny_args(workdir, *extra):
    return ["--config=configs/default.py:tiny", f"--workdir={workdir}", *extra]


def _other_model_workdir(path, corpus) -> str:
    """A workdir whose config.json is of another model (3 layers): all workdir.check reads."""
    from llm_jax.training import config as config_lib

    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_lib.to_json(config_lib.finalize(_config(corpus, **{"model.num_layers": 3}))))
    return str(path)


@pytest.mark.slow
def test_each_command_line_ends_a_user_error_in_one_line(run, tmp_path, capsys):
    corpus, data = run["corpus"], ["--config.data.source=text", f"--config.data.path={run['corpus']}"]
    hf_bad = tmp_path / "hf_bad"
    hf_bad.mkdir()
    (hf_bad / "config.json").write_text("{}")
    cases = [
        ("main", _tiny_args(tmp_path / "a", "--config.mesh.data=3"), r"needs 3 devices but 8 are available"),
        ("main", _tiny_args(tmp_path / "b", "--config.data.source=text", "--config.data.path=/nope.txt"),
         r"config\.data\.path='/nope.txt' does not exist"),
        ("main", _tiny_args(_other_model_workdir(tmp_path / "c", corpus), *data),
         r"holds the run of a different model: model\.num_layers is 3 there but 2 now"),
        ("main", ["--config=configs/nope.py", f"--workdir={tmp_path / 'd'}"],
         r"--config=configs/nope.py: the config file cannot be loaded \(\[Errno 2\] No such file"),
        ("main", _tiny_args(corpus), r"--workdir=\S+corpus.txt is a file, not a directory"),
        ("main", _tiny_args(tmp_path / "e", "--config.train.spike_factor=1"), r"spike_factor=1.0 must be above 1"),
        ("generate", [f"--workdir={tmp_path / 'none'}", "--prompt=x"],
         r"none/config.json does not exist: --workdir must be a run directory"),
        ("convert", ["from_hf", f"--hf_dir={hf_bad}", f"--workdir={tmp_path / 'f'}"],
         r"is neither a Hugging Face config \(no 'architectures'\) nor a run config"),
        ("convert", ["from_hf", f"--hf_dir={tmp_path / 'no_such_dir'}", f"--workdir={tmp_path / 'f'}"],
         r"no_such_dir is not a Hugging Face model directory: no config.json"),
        ("convert", ["to_hf", f"--workdir={tmp_path / 'none'}", f"--hf_dir={tmp_path / 'g'}"],
         r"none/config.json does not exist"),
        ("bench", ["--config=configs/bench_cpu.py", "--config.mesh.data=3"], r"needs 3 devices but 8 are available"),
        ("bench_decode", ["--prompt_len=300"], r"--prompt_len \+ --new_tokens - 1 must fit --max_len=256"),
    ]  # fmt: skip
    procs = [(tool, match, R.run_cli(f"llm_jax.{tool}", *args)) for tool, args, match in cases]
    printed = [R.assert_one_line_error(p, tool, match) for tool, match, p in procs]
    for name in "abdef":  # refused before anything was written: no workdir left behind
        assert not (tmp_path / name).exists(), name
    with capsys.disabled():
        print("\n" + "\n".join(printed))


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path):
    flag = R.run_cli("llm_jax.main", *_tiny_args(tmp_path / "a", "--config.mesh.data=3", "--debug"))
    env = R.run_cli("llm_jax.generate", f"--workdir={tmp_path}", "--prompt=x", extra_env={"LLM_JAX_DEBUG": "1"})
    for p, error in ((flag, "llm_jax.runtime.errors.BadValue: mesh shape"), (env, "llm_jax.runtime.errors.NotFound: ")):
        assert p.returncode != 0 and "Traceback (most recent call last)" in p.stderr and error in p.stderr, p.stderr
    # A bug (any exception but a UserError) keeps its traceback without being asked.
    code = "from llm_jax import cli; from llm_jax.runtime import errors; cli.run(lambda argv: {}, 'tool')"
    for body, ok in (("1 / 0", False), ("exec('raise errors.BadValue(\"bad x\\\\nfix it\")')", True)):
        p = subprocess.run([sys.executable, "-c", code.format(body)], cwd=R.REPO, env=R.env(1),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        if ok:
            R.assert_one_line_error(p, "tool", r"^tool: error: bad x fix it$")
        else:
            assert p.returncode != 0 and "ZeroDivisionError" in p.stderr and "Traceback" in p.stderr, p.stderr


# Root writes whatever the mode: its children run without that privilege (CAP_DAC_OVERRIDE and
# CAP_DAC_READ_SEARCH dropped from their bounding set, so they are gone after exec).
_AS_USER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search")


def test_read_only_workdir_fails_fast_and_generate_still_reads_it(workdir):
    kw = {}
    if os.geteuid() == 0:
        if not shutil.which("setpriv") or subprocess.run([*_AS_USER, "true"], capture_output=True).returncode:
            pytest.skip("running as root without setpriv or CAP_SETPCAP: no way to make a directory read-only to root")
        kw["prefix"] = _AS_USER
    before = R.snapshot(workdir)
    os.chmod(workdir, 0o555)
    try:
        p = R.run_cli("llm_jax.main", *_tiny_args(workdir, "--config.data.tokenizer=char"), **kw)
        gen = R.run_cli("llm_jax.generate", f"--workdir={workdir}", "--prompt=def", "--max_new_tokens=4", **kw)
    finally:
        os.chmod(workdir, 0o755)
    R.assert_one_line_error(
        p, "main", rf"^main: error: workdir {workdir} is not writable \({workdir}: Permission denied\)"
    )
    assert "data:" not in p.stdout, "refused before the data was loaded"
    assert gen.returncode == 0 and gen.stdout.startswith("def"), gen.stderr[-3000:]
    assert R.snapshot(workdir) == before
