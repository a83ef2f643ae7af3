"""launch/: every accelerate config loads with accelerate's own config classes and says what its
name promises; every key is one `accelerate launch` knows; the shell launchers parse."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

LAUNCH = Path(__file__).resolve().parents[1] / "launch"
CONFIGS = ["single_cpu", "single_gpu", "ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3", "multinode", "ddp_cpu", "multinode_cpu"]


def _launch_options() -> set[str]:
    from accelerate.commands.launch import launch_command_parser

    parser = launch_command_parser()
    return {a.dest for a in parser._actions}


def _load(name: str):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    cfg = load_config_from_file(str(LAUNCH / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig)
    return cfg


def test_every_config_file_is_tested():
    assert sorted(p.stem for p in LAUNCH.glob("*.yaml")) == sorted(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_keys_are_known(name):
    cfg = _load(name)
    raw = yaml.safe_load((LAUNCH / f"{name}.yaml").read_text())
    # ClusterConfig.from_yaml_file rejects unknown top-level keys; the nested sections are only
    # checked when launching, so check them against `accelerate launch`'s own options here.
    options = _launch_options()
    for key in (raw.get("fsdp_config") or {}):
        assert key in options, f"{name}: fsdp_config key {key!r} is not an accelerate launch option"
    for key in (raw.get("deepspeed_config") or {}):
        assert key in options, f"{name}: deepspeed_config key {key!r} is not an accelerate launch option"
    assert cfg.num_machines >= 1 and cfg.num_processes >= 1


def _dt(cfg) -> str:
    return str(getattr(cfg.distributed_type, "value", cfg.distributed_type))


def test_single_process_configs():
    cpu, gpu = _load("single_cpu"), _load("single_gpu")
    assert _dt(cpu) == "NO" and cpu.use_cpu is True and cpu.num_processes == 1
    assert _dt(gpu) == "NO" and gpu.use_cpu is False and gpu.mixed_precision == "bf16"


def test_ddp():
    cfg = _load("ddp")
    assert _dt(cfg) == "MULTI_GPU" and cfg.num_processes > 1 and cfg.num_machines == 1


def test_fsdp_is_v2_transformer_wrap_bf16():
    cfg = _load("fsdp")
    assert _dt(cfg) == "FSDP" and cfg.mixed_precision == "bf16"
    f = cfg.fsdp_config
    assert f["fsdp_version"] == 2
    assert f["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert f["fsdp_transformer_layer_cls_to_wrap"] == "LlamaDecoderLayer"
    # The class it names is the decoder layer our models are built from.
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert LlamaDecoderLayer.__name__ == f["fsdp_transformer_layer_cls_to_wrap"]


@pytest.mark.parametrize("name,stage", [("deepspeed_zero2", 2), ("deepspeed_zero3", 3)])
def test_deepspeed_stage(name, stage):
    cfg = _load(name)
    assert _dt(cfg) == "DEEPSPEED" and cfg.deepspeed_config["zero_stage"] == stage
    assert cfg.mixed_precision == "bf16"


def test_multinode_template():
    cfg = _load("multinode")
    assert cfg.num_machines >= 2 and cfg.num_processes >= cfg.num_machines
    assert cfg.machine_rank == 0 and cfg.main_process_ip and cfg.main_process_port


@pytest.mark.parametrize("script", ["slurm.sh", "torchrun.sh"])
def test_shell_launchers_parse(script):
    path = LAUNCH / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    # the packaged entry point: the script runs outside a checkout too
    assert "-m llm_refine.train" in text and "recipes/pretrain.py" not in text
    if script == "slurm.sh":
        assert "srun" in text and "accelerate launch" in text and "--machine_rank" in text
    else:
        assert "torchrun" in text
