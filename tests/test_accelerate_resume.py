"""AccelerateGradNormHook with accelerate's own checkpoints and trackers (issues #11, #12).

- A custom accelerate training loop in the style of transformers' ``run_clm_no_trainer.py`` example
  (``tests/_clm_no_trainer_loop.py``: our own script, same flags, ``step_<N>`` checkpoints and
  ``clm_no_trainer`` tracker project; its only llm-refine line is the README's one-line hook) under
  kill and resume: ``--checkpointing_steps 3``, SIGKILL in optimizer step 10 (after ``step_9`` was
  saved), resume with ``--resume_from_checkpoint step_6``, finish: the history has each of the steps
  0..11 exactly once, and equals an uninterrupted run's history bit for bit. 1 process and 2 gloo
  processes (``accelerate launch --config_file launch/ddp_cpu.yaml``).
- The same test over the real stock example, when the user provides it:
  ``LLM_REFINE_STOCK_RUN_CLM=/path/to/transformers/examples/pytorch/language-modeling/run_clm_no_trainer.py``.
  The test copies it into its tmp dir and inserts the one-line hook (and its import) right after
  the script's ``accelerator.prepare(`` call; nothing of it is kept in this repository. Skipped
  when the variable is unset.
- Tracker logging: the norms in accelerate's TensorBoard tracker at tracker step = history step + 1,
  read back with tensorboard's own EventAccumulator.
- The warned/handled cases: a fresh hook over an existing history (moved aside to ``.prev``), a
  resume whose history does not hold 0..N-1, a hook never closed (flushed at exit, warned), the
  launch accelerate does not see (names ACCELERATE_USE_CPU=1).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from llm_refine.errors import UserError
from llm_refine.history import read_jsonl

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "_clm_no_trainer_loop.py"
STOCK_ENV = "LLM_REFINE_STOCK_RUN_CLM"
RUNNER = REPO / "tests" / "_clm_kill_runner.py"

STEPS = 12
ACCUM = 2
CKPT_EVERY = 3
KILL_IN_STEP = 10  # 0-based optimizer step in progress when the process is killed (after step_9 was saved)
RESUME_FROM = 6


# -- local inputs: no hub ---------------------------------------------------------------------------
def _words(n: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    vocab = [f"w{i}" for i in range(60)]
    return [vocab[int(i)] for i in torch.randint(0, len(vocab), (n,), generator=g)]


@pytest.fixture(scope="module")
def clm_inputs(tmp_path_factory) -> dict[str, Path]:
    """A tokenizer trained and saved here, a tiny Llama config dir, train/validation text files."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("clm_inputs")
    train = root / "train.txt"
    val = root / "validation.txt"
    # Every training line is the same 16 words, and --block_size is 16, so every training block is the
    # same: the script's shuffled loader (ours, like the stock example's) draws its permutation from the global torch RNG, which
    # load_state restores to the checkpoint's state, so after a resume the batches come in another order
    # than in the uninterrupted run (measured with varied text: the first resumed step's l1 70.73 vs
    # 71.02). With identical blocks the order cannot matter and the norms must match bit for bit.
    line = " ".join(_words(16, 0))
    train.write_text((line + "\n") * 100)
    w = _words(400, 1)
    val.write_text("\n".join(" ".join(w[i:i + 16]) for i in range(0, 400, 16)) + "\n")

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train([str(train), str(val)], trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   model_max_length=64)
    fast.save_pretrained(root / "tokenizer")

    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    cfg.save_pretrained(root / "config")
    return {"root": root, "train": train, "validation": val, "tokenizer": root / "tokenizer", "config": root / "config"}


def _env(inputs, tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_CPU")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", HF_HOME=str(inputs["root"] / "hf_home"), PYTHONHASHSEED="0",
               ACCELERATE_CONFIG_FILE=str(tmp_path / "no-accelerate-config.yaml"))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_clm(inputs, out: Path, tmp_path, *, procs: int, extra=(), kill_at_backward: int = 0,
             timeout: int = 240, script: Path = SCRIPT) -> subprocess.CompletedProcess:
    args = [str(script), "--config_name", str(inputs["config"]), "--tokenizer_name", str(inputs["tokenizer"]),
            "--train_file", str(inputs["train"]), "--validation_file", str(inputs["validation"]),
            "--block_size", "16", "--per_device_train_batch_size", "2", "--per_device_eval_batch_size", "4",
            "--gradient_accumulation_steps", str(ACCUM), "--max_train_steps", str(STEPS),
            "--num_train_epochs", "1", "--learning_rate", "3e-3", "--num_warmup_steps", "2", "--seed", "0",
            "--checkpointing_steps", str(CKPT_EVERY), "--output_dir", str(out), *extra]
    if procs == 1:
        cmd = [sys.executable, str(RUNNER), *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "ddp_cpu.yaml"),
               "--num_processes", str(procs), "--main_process_port", str(_free_port()), str(RUNNER), *args]
    env = _env(inputs, tmp_path)
    if procs > 1:
        # The script's Accelerator() has no cpu=True (like the stock example's), and launch/ddp_cpu.yaml's use_cpu does not
        # reach it: without this each process trains alone and the hook refuses to record (its error
        # names this variable; seen with exactly this launch).
        env["ACCELERATE_USE_CPU"] = "1"
    if kill_at_backward:
        env["CLM_KILL_AT_BACKWARD"] = str(kill_at_backward)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(tmp_path))


def _steps(path: Path) -> list[int]:
    return [r["step"] for r in read_jsonl(path)[1]]


def _kill_and_resume(clm_inputs, tmp_path, procs: int, extra=(), script: Path = SCRIPT):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "run"
    ref = _run_clm(clm_inputs, ref_dir, tmp_path, procs=procs, extra=extra, script=script)
    assert ref.returncode == 0, ref.stderr[-4000:]

    # Killed at the first micro-batch of optimizer step KILL_IN_STEP (after step_9 was saved).
    killed = _run_clm(clm_inputs, run_dir, tmp_path, procs=procs, extra=extra, script=script,
                      kill_at_backward=KILL_IN_STEP * ACCUM + 1)
    assert killed.returncode != 0
    assert (run_dir / "step_9").is_dir() and not (run_dir / "step_12").exists()
    # save_state flushed and fsynced the history: on disk it is exactly the steps before the checkpoint.
    assert _steps(run_dir / "gradnorms.jsonl") == list(range(9))

    resumed = _run_clm(clm_inputs, run_dir, tmp_path, procs=procs, script=script,
                       extra=(*extra, "--resume_from_checkpoint", str(run_dir / f"step_{RESUME_FROM}")))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "gradient-norm history" not in resumed.stderr  # no gap / wrong-start warning
    assert "never closed" not in resumed.stderr + ref.stderr  # end_training closed the hook

    meta_ref, rec_ref = read_jsonl(ref_dir / "gradnorms.jsonl")
    meta, rec = read_jsonl(run_dir / "gradnorms.jsonl")
    assert [r["step"] for r in rec] == list(range(STEPS))  # each true step exactly once
    assert [r["step"] for r in rec_ref] == list(range(STEPS))
    assert meta["world_size"] == procs == meta_ref["world_size"]
    assert meta["engine"] == ("ddp" if procs > 1 else "single")
    # Deterministic math (fp32 CPU, same data order, exact state restore): bit-identical norms.
    assert [(r["l1"], r["l2"]) for r in rec] == [(r["l1"], r["l2"]) for r in rec_ref]
    return ref_dir, run_dir


HOOK_IMPORT = "from llm_refine import AccelerateGradNormHook"
HOOK_LINE = 'AccelerateGradNormHook(accelerator, model, optimizer, f"{args.output_dir}/gradnorms.jsonl")'


def _insert_hook(text: str) -> str:
    """``text`` with the README's one-line hook (and its import) inserted, at the indentation of the
    first ``accelerator.prepare(`` call, on the line after that call's closing parenthesis."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        col = line.find("accelerator.prepare(")
        if col < 0 or line.lstrip().startswith("#"):
            continue
        depth, j, k = 0, i, col + len("accelerator.prepare")
        while True:  # to the line holding the matching ")"
            for ch in lines[j][k:]:
                depth += (ch == "(") - (ch == ")")
                if depth == 0:
                    break
            if depth == 0:
                break
            j, k = j + 1, 0
            if j == len(lines):
                raise AssertionError("unbalanced accelerator.prepare( call")
        indent = line[:len(line) - len(line.lstrip())]
        hook = f"{indent}{HOOK_IMPORT}\n{indent}{HOOK_LINE}  # llm-refine: the one-line hook\n"
        return "".join(lines[:j + 1] + [hook] + lines[j + 1:])
    raise AssertionError("no accelerator.prepare( call to put the hook after")


def test_insert_hook_after_multiline_prepare():
    src = ("def main():\n"
           "    # accelerator.prepare( in a comment is not the call\n"
           "    model, opt = accelerator.prepare(\n"
           "        model, f(opt)\n"
           "    )\n"
           "    train()\n")
    out = _insert_hook(src).splitlines()
    assert out[5:7] == [f"    {HOOK_IMPORT}", f"    {HOOK_LINE}  # llm-refine: the one-line hook"]
    assert out[4] == "    )" and out[7] == "    train()"
    compile("\n".join(out), "<hooked>", "exec")


def _script(variant: str, tmp_path: Path) -> Path:
    if variant == "ours":
        return SCRIPT
    stock = os.environ.get(STOCK_ENV)
    if not stock:
        pytest.skip(f"the stock example is not part of this repository: set {STOCK_ENV}=/path/to/"
                    "run_clm_no_trainer.py (transformers' examples/pytorch/language-modeling/) to run "
                    "this test over it; the test inserts the one-line hook into a tmp copy")
    src = Path(stock)
    assert src.is_file(), f"{STOCK_ENV}={stock}: no such file"
    dst = tmp_path / "stock_run_clm_no_trainer.py"
    dst.write_text(_insert_hook(src.read_text()))
    return dst


VARIANTS = pytest.mark.parametrize("variant", ["ours", "stock"])


@pytest.mark.distributed  # starts processes (3 runs of the script)
@VARIANTS
def test_clm_style_loop_kill_and_resume_single_process(clm_inputs, tmp_path, variant):
    ref_dir, run_dir = _kill_and_resume(clm_inputs, tmp_path, 1, extra=("--with_tracking", "--report_to", "tensorboard"),
                                        script=_script(variant, tmp_path))
    # The tracker got the same norms at tracker step = history step + 1; the killed segment's values for
    # steps past the checkpoint stay in its own event file, the resumed run's file has them again.
    _, rec = read_jsonl(run_dir / "gradnorms.jsonl")
    scalars = _tb_scalars(run_dir / "clm_no_trainer")
    assert [s for s, _ in scalars["grad_l1_norm"]] == list(range(1, STEPS + 1))
    assert [v for _, v in scalars["grad_l1_norm"]] == pytest.approx([r["l1"] for r in rec], rel=1e-7)
    assert [v for _, v in scalars["grad_l2_norm"]] == pytest.approx([r["l2"] for r in rec], rel=1e-7)


@pytest.mark.distributed
@VARIANTS
def test_clm_style_loop_kill_and_resume_two_processes(clm_inputs, tmp_path, variant):
    _kill_and_resume(clm_inputs, tmp_path, 2, script=_script(variant, tmp_path))


# -- trackers -------------------------------------------------------------------------------------------
def _tb_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of every event file under ``logdir``, read with tensorboard's EventAccumulator one file
    at a time in the order they were written; a later file's value for a step replaces an earlier one
    (a resumed run logs again the steps the killed segment had logged past its checkpoint)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(logdir.rglob("events.out.tfevents.*"), key=lambda f: (f.stat().st_mtime_ns, f.name))
    assert files, f"no TensorBoard event files under {logdir}"
    out: dict[str, dict[int, float]] = {}
    for f in files:
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update((e.step, e.value) for e in acc.Scalars(tag))
    return {k: sorted(v.items()) for k, v in out.items()}


class Reg(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).pow(2).mean()


def _setup(tmp_path, **acc_kwargs):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True, **acc_kwargs)
    model = Reg()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = accelerator.prepare(model, opt)
    return accelerator, model, opt


def _train(accelerator, model, opt, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        loss = model(torch.randn(8, 4, generator=g))
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()


def test_hook_logs_norms_to_tensorboard_tracker(tmp_path):
    from llm_refine import AccelerateGradNormHook

    accelerator, model, opt = _setup(tmp_path, log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    hook = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl", flush_every=2)
    accelerator.init_trackers("run")  # after the hook: the trackers are looked up at each flush
    _train(accelerator, model, opt, 5)
    accelerator.end_training()  # closes the hook first: the last records reach the tracker
    _, rec = read_jsonl(tmp_path / "g.jsonl")
    scalars = _tb_scalars(tmp_path / "tb")
    assert [r["step"] for r in rec] == [0, 1, 2, 3, 4]
    assert scalars["grad_l1_norm"] == [(r["step"] + 1, pytest.approx(r["l1"], rel=1e-7)) for r in rec]
    assert scalars["grad_l2_norm"] == [(r["step"] + 1, pytest.approx(r["l2"], rel=1e-7)) for r in rec]


def test_hook_tracker_opt_out(tmp_path):
    from llm_refine import AccelerateGradNormHook

    accelerator, model, opt = _setup(tmp_path, log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    accelerator.init_trackers("run")
    hook = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl", log_to_trackers=False)
    _train(accelerator, model, opt, 3)
    hook.close()
    accelerator.end_training()
    tags = _tb_scalars(tmp_path / "tb") if list((tmp_path / "tb").rglob("events.out.tfevents.*")) else {}
    assert not any(t.startswith("grad_") for t in tags)


# -- save_state / load_state in one process ---------------------------------------------------------------
def test_save_state_syncs_and_load_state_truncates_and_restores_step(tmp_path):
    from llm_refine import AccelerateGradNormHook

    path = tmp_path / "g.jsonl"
    accelerator, model, opt = _setup(tmp_path)
    hook = AccelerateGradNormHook(accelerator, model, opt, path, flush_every=50)
    _train(accelerator, model, opt, 4)
    accelerator.save_state(str(tmp_path / "ck4"))
    assert _steps(path) == [0, 1, 2, 3]  # flushed at save_state although flush_every=50
    _train(accelerator, model, opt, 3, seed=2)
    accelerator.save_state(str(tmp_path / "ck7"))
    assert _steps(path) == list(range(7))
    hook.remove()  # "killed": never closed, wrappers gone

    # A new process: the one-liner, then load_state from the earlier checkpoint.
    accelerator, model, opt = _setup(tmp_path)
    hook = AccelerateGradNormHook(accelerator, model, opt, path)
    assert _steps(path) == list(range(7))  # nothing dropped before the position is known
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerator.load_state(str(tmp_path / "ck4"))
    assert hook.step == 4 and _steps(path) == [0, 1, 2, 3]
    _train(accelerator, model, opt, 2, seed=3)
    hook.close()
    assert _steps(path) == list(range(6))


def test_fresh_hook_over_existing_history_moves_it_aside(tmp_path):
    from llm_refine import AccelerateGradNormHook

    path = tmp_path / "g.jsonl"
    accelerator, model, opt = _setup(tmp_path)
    hook = AccelerateGradNormHook(accelerator, model, opt, path)
    _train(accelerator, model, opt, 3)
    hook.close()
    old = path.read_bytes()

    accelerator, model, opt = _setup(tmp_path)
    hook = AccelerateGradNormHook(accelerator, model, opt, path)
    with pytest.warns(UserWarning, match=r"already held 3 records .* moved them to .*g\.jsonl\.prev"):
        _train(accelerator, model, opt, 2)
    hook.close()
    assert (tmp_path / "g.jsonl.prev").read_bytes() == old  # the old run's bytes, intact
    assert _steps(path) == [0, 1]


def test_resume_with_history_not_starting_at_zero_warns(tmp_path):
    from llm_refine import AccelerateGradNormHook

    accelerator, model, opt = _setup(tmp_path)
    first = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "a.jsonl")
    _train(accelerator, model, opt, 3)
    accelerator.save_state(str(tmp_path / "ck3"))
    first.close()

    accelerator, model, opt = _setup(tmp_path)
    hook = AccelerateGradNormHook(accelerator, model, opt, tmp_path / "b.jsonl")  # another file
    with pytest.warns(UserWarning, match=r"b\.jsonl \(the checkpoint was saved by a hook writing .*a\.jsonl\) holds no records"):
        accelerator.load_state(str(tmp_path / "ck3"))
    _train(accelerator, model, opt, 1)
    hook.close()
    assert _steps(tmp_path / "b.jsonl") == [3]


def test_hook_never_closed_flushes_at_exit_with_warning(tmp_path):
    code = f"""
import torch
from accelerate import Accelerator
from llm_refine import AccelerateGradNormHook
accelerator = Accelerator(cpu=True)
model = torch.nn.Linear(4, 3)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
model, opt = accelerator.prepare(model, opt)
AccelerateGradNormHook(accelerator, model, opt, {str(tmp_path / 'g.jsonl')!r})
for _ in range(30):
    model(torch.randn(8, 4)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "was never closed: wrote its last 30 buffered steps at interpreter exit" in r.stderr
    assert _steps(tmp_path / "g.jsonl") == list(range(30))


def test_launch_accelerate_does_not_see_names_accelerate_use_cpu(tmp_path, monkeypatch):
    from llm_refine import AccelerateGradNormHook

    accelerator, model, opt = _setup(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="ACCELERATE_USE_CPU=1"):
        AccelerateGradNormHook(accelerator, model, opt, tmp_path / "g.jsonl")
