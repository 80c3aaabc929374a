"""The bad-input catalog: one table of API and CLI misuse. Every case must raise a typed error from
`shortllm.errors` whose message says what is wrong and how to fix it; CLI cases must exit 2 with one
line on stderr, no traceback (unless --debug), and leave no partial output behind."""
from __future__ import annotations

import errno
import os
from importlib import import_module
from types import SimpleNamespace

import pytest
import torch
from tiny_models import make_tiny, random_batch

from shortllm import errors as E

# words that say how to fix it: every message must contain one of these
FIX_WORDS = ("use", "pass", "give", "choose", "remove", "drop", "lower", "delete", "re-", "score", "rerun", "load",
             "point", "ask", "set", "add", "e.g.", "fewer", "check", "free", "make", "restore", "fix", "rename",
             "at most", "must")


def _tokenizer(with_pad: bool = True):
    """A word-level tokenizer built in code (no download): ids < 128, the tiny models' vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ("the of and to in a is was for on as with by that at from his it an were are which be this has "
             "also or had its first their after one new have been who not two but they he = @ , . - ( ) ; : ' "
             "\"").split()
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"pad_token": "<pad>", "eos_token": "<eos>"} if with_pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **special)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from shortllm.pruning.plans import make_plan
    from shortllm.scoring.engine import score_fast

    tmp = tmp_path_factory.mktemp("bad")
    model = make_tiny("llama", num_layers=8)
    other = make_tiny("llama", num_layers=8, seed=3)
    model_dir, other_dir = tmp / "tiny", tmp / "other"
    model.save_pretrained(model_dir)
    _tokenizer().save_pretrained(model_dir)
    other.save_pretrained(other_dir)
    data = [random_batch(2, 11, seed=s) for s in range(2)]
    scores = score_fast(model, data, metrics=("bi", "taylor", "mag"), progress=False)
    other_scores = score_fast(other, data, metrics=("bi", "mag"), progress=False)
    other_scores.save(tmp / "other_scores.json")
    scores.save(tmp / "scores.json")
    make_plan(other_scores, "bi", model=other, remove=2).save(tmp / "other_plan.json")
    good = (tmp / "scores.json").read_text()
    (tmp / "truncated.json").write_text(good[: len(good) // 2])
    (tmp / "not_a_plan.json").write_text('{"format": "shortllm.plan/1", "num_layers": ')
    (tmp / "latin1.txt").write_bytes("caf\xe9 na\xefve ".encode("latin-1") * 50)
    (tmp / "exists").mkdir()
    (tmp / "a_file").write_text("x")
    return SimpleNamespace(tmp=tmp, model=model, other=other, model_dir=model_dir, other_dir=other_dir, data=data,
                           scores=scores, tok=_tokenizer())


def _score(env, data=None, **kw):
    from shortllm.scoring.engine import score_fast

    kw.setdefault("metrics", ("bi",))
    return score_fast(env.model, env.data if data is None else data, progress=False, **kw)


def _plan(env, **kw):
    from shortllm.pruning.plans import make_plan

    metric = kw.pop("metric", "taylor")
    return make_plan(env.scores, metric, model=env.model, **kw)


def _loader(env, source, **kw):
    from shortllm.data.calibration import calibration_loader

    return calibration_loader(source, kw.pop("tok", env.tok), **kw)


def _nonfinite(env, metrics, value):
    blk = env.model.model.layers[5]
    saved = blk.mlp.down_proj.weight.detach().clone()
    with torch.no_grad():
        blk.mlp.down_proj.weight[0, :] = value
    try:
        _score(env, metrics=metrics)
    finally:
        with torch.no_grad():
            blk.mlp.down_proj.weight.copy_(saved)


def _unsupported(env):
    from shortllm.model.adapters import get_adapter

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="toy-rnn")
            self.rnn = torch.nn.GRU(4, 4)

    get_adapter(Toy())


def _encoder_only(env):
    import transformers

    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  vocab_size=64)
    _score(SimpleNamespace(model=transformers.BertForMaskedLM(cfg).eval(), data=env.data))


def _export(env, out, **kw):
    from shortllm.pruning.exporting import export

    return export(env.model, out, **kw)


def _export_full_disk(env, monkeypatch):
    import transformers.modeling_utils

    def no_space(state_dict, filename, *a, **k):
        with open(filename, "wb") as f:  # a disk that fills up half-way through a shard
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", no_space)
    _export(env, env.tmp / "full_disk_out")


def _resume_other_metrics(env):
    ck = env.tmp / "resume_ck"
    _score(env, metrics=("bi",), checkpoint=str(ck), every=1)
    _score(env, metrics=("bi", "angular"), checkpoint=str(ck), every=1)


API = [
    ("unsupported architecture", _unsupported, E.UnsupportedModelError, "toy-rnn"),
    ("encoder-only model", _encoder_only, E.UnsupportedModelError, "(?i)bert"),
    ("empty loader", lambda env: _score(env, data=[]), E.EmptyLoaderError, "empty|no batch"),
    ("empty generator", lambda env: _score(env, data=iter([])), E.EmptyLoaderError, "no batch"),
    ("batch with no valid token",
     lambda env: _score(env, data=[{"input_ids": torch.ones(2, 5, dtype=torch.long),
                                    "attention_mask": torch.zeros(2, 5, dtype=torch.long)}]),
     E.EmptyLoaderError, "batch 0 has no valid token"),
    ("sequence longer than max positions", lambda env: _score(env, data=[random_batch(1, 300, pad=False)]),
     E.SequenceTooLongError, "300 tokens.*256 positions.*seq.len"),
    ("NaN activations (bi)", lambda env: _nonfinite(env, ("bi",), float("nan")), E.NonFiniteError,
     "block 5 on calibration batch 0"),
    ("Inf activations (taylor)", lambda env: _nonfinite(env, ("taylor",), float("inf")), E.NonFiniteError,
     "block 5.*batch 0|batch 0.*float32"),
    ("unknown metric", lambda env: _score(env, metrics=("bi", "perplexity")), E.MetricError, "perplexity.*choose"),
    ("n_max >= L", lambda env: _score(env, metrics=("angular",), n_max=8), E.MetricError, r"n_max=8.*\[1, 7\]"),
    ("bad taylor_mode", lambda env: _score(env, metrics=("taylor",), taylor_mode="approx"), E.MetricError, "approx"),
    ("bad angular_tokens", lambda env: _score(env, angular_tokens="first"), E.MetricError, "'all' or 'last'"),
    ("float input_ids (dtype mix)",
     lambda env: _score(env, data=[{"input_ids": torch.ones(1, 5), "attention_mask": torch.ones(1, 5)}]),
     E.DataError, "integer"),
    ("remove K >= L", lambda env: _plan(env, metric="bi", remove=8), E.PlanError, "at most 7"),
    ("remove K > allowed by protect", lambda env: _plan(env, remove=3), E.PlanError, r"protect=\(4, 2\).*only 2"),
    ("protect overlapping", lambda env: _plan(env, metric="bi", remove=1, protect=(4, 4)), E.PlanError, "protect"),
    ("ratio = 0", lambda env: _plan(env, ratio=0.0), E.PlanError, r"in \(0, 1\)"),
    ("ratio > 1", lambda env: _plan(env, ratio=1.5), E.PlanError, r"in \(0, 1\)"),
    ("scores JSON of another model",
     lambda env: import_module("shortllm.scoring.scores").Scores.load(env.tmp / "other_scores.json", model=env.model),
     E.ScoresMismatchError, "different weights|re-score"),
    ("plan JSON of another model",
     lambda env: import_module("shortllm.pruning.plans").Plan.load(env.tmp / "other_plan.json", model=env.model),
     E.PlanError, "other weights|this model"),
    ("truncated scores JSON",
     lambda env: import_module("shortllm.scoring.scores").Scores.load(env.tmp / "truncated.json"),
     E.DataError, "not a valid shortllm scores file"),
    ("corrupted plan JSON", lambda env: import_module("shortllm.pruning.plans").Plan.load(env.tmp / "not_a_plan.json"),
     E.PlanError, "not valid JSON|not a valid"),
    ("export dir exists", lambda env: _export(env, env.tmp / "exists"), E.ExportError, "already exists.*overwrite"),
    ("export dir unwritable", lambda env: _export(env, env.tmp / "a_file" / "out"), E.ExportError, "writable"),
    ("missing data file", lambda env: _loader(env, str(env.tmp / "nope.txt")), E.DataError, "does not exist"),
    ("unknown corpus name", lambda env: _loader(env, "wikitext-99"), E.DataError, "wikitext-99.*not a corpus"),
    ("zero-length text", lambda env: _loader(env, ["", "   "]), E.EmptyLoaderError, "empty"),
    ("non-UTF-8 file", lambda env: _loader(env, env.tmp / "latin1.txt"), E.DataError, "not valid UTF-8.*re-encode"),
    ("seq_len < 2", lambda env: _loader(env, "wikitext2", seq_len=1), E.DataError, "seq_len must be >= 2"),
    ("tokenizer without pad/bos, add_bos",
     lambda env: _loader(env, ["a b c"], tok=_tokenizer(with_pad=False), add_bos=True), E.DataError, "bos"),
    ("no tokenizer for text", lambda env: _loader(env, ["the of and"], tok=None), E.DataError, "tokenizer"),
    ("missing model dir", lambda env: import_module("shortllm.model.loading").load_model(str(env.tmp / "no_model")),
     E.ModelLoadError, "No checkpoint dir"),
    ("model dir without config",
     lambda env: import_module("shortllm.model.loading").load_model(str(env.tmp / "exists")),
     E.ModelLoadError, "no config.json"),
    ("resume with other metrics", _resume_other_metrics, E.CheckpointError, "metric set"),
]


def _check_api(env, what, call, exc, match):
    with pytest.raises(exc, match=match) as info:
        call(env)
    msg = str(info.value)
    assert isinstance(info.value, E.ShortLLMError)
    assert any(w in msg.lower() for w in FIX_WORDS), f"{what}: message does not say how to fix it: {msg}"


def test_export_full_disk_leaves_nothing(env, monkeypatch):
    before = set(os.listdir(env.tmp))
    with pytest.raises(E.ExportError, match="No space left.*nothing was written.*Free disk space"):
        _export_full_disk(env, monkeypatch)
    assert set(os.listdir(env.tmp)) == before, "a failed export left files behind"


def test_tokenizer_without_pad_token_still_pads_and_masks(env):
    data = _loader(env, ["the of and to in", "the of"], tok=_tokenizer(with_pad=False), mode="contiguous",
                   batch_size=2, n_samples=None)
    (b,) = list(data)
    assert b["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0]]


# ---- CLI: exit 2, one line on stderr, no traceback, no partial output -----------------------------------

def _cli_cases():
    S = ["score"]
    return [
        ("score: unknown metric", lambda e: S + [str(e.model_dir), "--metrics", "bi,foo"], "unknown metric"),
        ("score: n_max >= L", lambda e: S + [str(e.model_dir), "--metrics", "angular", "--n-max", "8"], "n_max=8"),
        ("score: unknown corpus", lambda e: S + [str(e.model_dir), "--data", "wikitext-99"], "not a corpus"),
        ("score: missing data file", lambda e: S + [str(e.model_dir), "--data", str(e.tmp / "missing.txt")],
         "does not exist"),
        ("score: non-UTF-8 file", lambda e: S + [str(e.model_dir), "--data", str(e.tmp / "latin1.txt")],
         "not valid UTF-8"),
        ("score: sequence too long", lambda e: S + [str(e.model_dir), "--data", "wikitext2", "--seq-len", "300",
                                                    "--samples", "1"], "positions"),
        ("score: missing model", lambda e: S + [str(e.tmp / "no_model")], "No checkpoint dir"),
        ("score: resume mismatch", lambda e: S + [str(e.model_dir), "--data", "wikitext2", "--samples", "2",
                                                  "--seq-len", "16", "--metrics", "angular",
                                                  "--checkpoint", str(e.tmp / "cli_ck")], "metric set"),
        ("prune: scores of another model", lambda e: ["prune", str(e.model_dir), "--scores",
                                                      str(e.tmp / "other_scores.json"), "--metric", "bi",
                                                      "--remove", "1"], "re-score|other weights|different"),
        ("prune: truncated scores", lambda e: ["prune", str(e.model_dir), "--scores", str(e.tmp / "truncated.json"),
                                               "--metric", "bi", "--remove", "1"], "not a valid shortllm scores"),
        ("prune: ratio outside (0,1)", lambda e: ["prune", str(e.model_dir), "--scores", str(e.tmp / "scores.json"),
                                                  "--metric", "bi", "--ratio", "1.5"], r"\(0, 1\)"),
        ("prune: remove > allowed", lambda e: ["prune", str(e.model_dir), "--scores", str(e.tmp / "scores.json"),
                                               "--metric", "taylor", "--remove", "3"], "removable"),
        # options that do not apply to the chosen mode are errors, not silently ignored
        ("score: --every without --checkpoint", lambda e: S + [str(e.model_dir), "--every", "2"],
         "--every does not apply without --checkpoint"),
        ("score: --checkpoint with --offload disk", lambda e: S + [str(e.model_dir), "--offload", "disk",
                                                                   "--checkpoint", str(e.tmp / "ck2")],
         "--checkpoint does not apply with --offload disk"),
        ("score: --spill without --offload disk", lambda e: S + [str(e.model_dir), "--spill", "disk"],
         "--spill does not apply without --offload disk"),
        ("prune: --plan with --scores", lambda e: ["prune", str(e.model_dir), "--plan", str(e.tmp / "plan.json"),
                                                   "--scores", str(e.tmp / "scores.json")], "--scores.*--plan"),
        ("prune: --ratio without --scores", lambda e: ["prune", str(e.model_dir), "--ratio", "0.2"],
         "--scores FILE and --metric"),
        ("prune: plan of another model",
         lambda e: ["prune", str(e.model_dir), "--plan", str(e.tmp / "other_plan.json")],
         "other weights|this model"),
        # an output that cannot be written is found before any work starts
        ("score: unwritable -o", lambda e: S + [str(e.model_dir), "-o", "/proc/shortllm-nope/s.json"],
         "cannot be written"),
        ("score: -o under a file", lambda e: S + [str(e.model_dir), "-o", str(e.tmp / "a_file" / "s.json")],
         "is a file"),
        ("search: unwritable -o", lambda e: ["search", str(e.model_dir), "--remove", "1", "-o",
                                             "/proc/shortllm-nope/p.json"], "cannot be written"),
        ("prune: -o exists", lambda e: ["prune", str(e.model_dir), "--blocks", "3", "-o", str(e.tmp / "exists")],
         "already exists.*--overwrite"),
        ("eval: unwritable -o", lambda e: ["eval", str(e.model_dir), "--tasks", "none", "-o",
                                           "/proc/shortllm-nope/e.json"], "cannot be written"),
    ]


CLI = _cli_cases()


@pytest.fixture(scope="module")
def cli_env(env):
    # the resume-mismatch case needs an existing checkpoint of another metric set
    from shortllm.cli.app import main

    out = env.tmp / "cli_first.json"
    assert main(["score", str(env.model_dir), "--data", "wikitext2", "--samples", "2", "--seq-len", "16",
                 "--metrics", "bi", "--checkpoint", str(env.tmp / "cli_ck"), "-q", "-o", str(out)]) == 0
    return env


def _check_cli(cli_env, capsys, what, argv, match):
    from shortllm.cli.app import main

    out = cli_env.tmp / f"cli_out_{abs(hash(what))}"
    args = argv(cli_env)
    if "-o" not in args:
        args = args + ["-o", str(out) + (".json" if args[0] in ("score", "search") else "")]
    if args[0] == "score":
        args += ["-q"]
    capsys.readouterr()
    code = main(args)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    assert code == 2, f"{what}: exit {code}, stderr {err!r}"
    assert len(lines) == 1, f"{what}: expected one line on stderr, got {lines}"
    assert "Traceback" not in err
    import re

    assert re.search(match, lines[0]), f"{what}: {lines[0]!r} does not match {match!r}"
    assert any(w in lines[0].lower() for w in FIX_WORDS), f"{what}: no fix in {lines[0]!r}"
    leftovers = [p.name for p in cli_env.tmp.iterdir() if p.name.lstrip(".").startswith(out.name)]
    assert not leftovers, f"{what}: partial output left behind: {leftovers}"


# the catalog: one table, API rows (typed exception + fix in the message) and CLI rows (exit 2, one line,
# no traceback, no partial output)
CATALOG = ([pytest.param("api", what, call, exc, match, id=f"api: {what}") for what, call, exc, match in API]
           + [pytest.param("cli", what, argv, None, match, id=f"cli: {what}") for what, argv, match in CLI])


@pytest.mark.parametrize("kind, what, call, exc, match", CATALOG)
def test_bad_input(request, env, kind, what, call, exc, match):
    if kind == "api":
        _check_api(env, what, call, exc, match)
    else:
        _check_cli(request.getfixturevalue("cli_env"), request.getfixturevalue("capsys"), what, call, match)


def test_catalog_size():
    assert len(CATALOG) >= 25


def test_cli_debug_shows_the_traceback(cli_env):
    from shortllm.cli.app import main

    with pytest.raises(E.MetricError):
        main(["--debug", "score", str(cli_env.model_dir), "--metrics", "foo", "-q", "-o", str(cli_env.tmp / "d.json")])


def test_cli_subprocess_exit_code_and_one_line(cli_env):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "shortllm.cli", "score", str(cli_env.model_dir), "--metrics",
                           "xyz", "-q", "-o", str(cli_env.tmp / "sub.json")], capture_output=True, text=True,
                          timeout=300, cwd=cli_env.tmp)
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and "%|" not in ln]  # transformers' load bar
    assert len(lines) == 1 and "xyz" in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not (cli_env.tmp / "sub.json").exists()
