"""Copy a pipeline output tree into the repo without checkpoints: the files the report reads, the
linear baselines' gradient-norm histories and those of any other run a schedule was refined from
(round 2 refines the refined run), unchanged, and each run's train log trimmed to step, loss and
lr (the schedule as trained)."""
import json, shutil, sys
from pathlib import Path

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for f in ("pipeline_state.json", "recipe.yaml"):
    if (src / f).exists():
        shutil.copy2(src / f, dst / f)
sources = set()  # run dirs whose gradnorms.jsonl a schedule file of the tree was refined from
for art in src.glob("cpu-*/refined_schedule*.json"):
    prov = json.loads(art.read_text()).get("provenance") or {}
    for p in [prov.get("source")] + list((prov.get("pipeline") or {}).get("sources") or []):
        if isinstance(p, str) and p.endswith("gradnorms.jsonl"):
            sources.add(Path(p).parent.name)
for size in [p for p in src.iterdir() if p.is_dir() and p.name.startswith("cpu-")]:
    (dst / size.name).mkdir(exist_ok=True)
    for f in size.iterdir():
        if f.is_file():
            shutil.copy2(f, dst / size.name / f.name)
    for run in [p for p in size.iterdir() if p.is_dir()]:
        out = dst / size.name / run.name
        out.mkdir(exist_ok=True)
        for f in ("summary.json", "eval.json", "eval_log.jsonl", "run_config.json", "pipeline_stage.json"):
            if (run / f).exists():
                shutil.copy2(run / f, out / f)
        if (run.name.startswith("linear") or run.name in sources) and (run / "gradnorms.jsonl").exists():
            shutil.copy2(run / "gradnorms.jsonl", out / "gradnorms.jsonl")
        if (run / "train_log.jsonl").exists():
            with open(run / "train_log.jsonl") as fi, open(out / "train_log.jsonl", "w") as fo:
                for line in fi:
                    r = json.loads(line)
                    fo.write(json.dumps({k: r[k] for k in ("step", "loss", "lr") if k in r}) + "\n")
print("exported", dst)
