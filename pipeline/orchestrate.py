"""`videomamba run`: a recipe's whole pipeline as one resumable job on a Ray cluster: shard each corpus not sharded
yet -> stage 1 -> stage 2 -> stage 2's unmasked phase -> every zero-shot evaluation -> the report.

Each step writes under --out (shards/NAME/, stage1/, stage2/, unmasked/, eval_stage2/, report.md, report.html,
plots/) and, when complete, its marker OUT/steps/<step>.json. Running the same command again skips complete steps
and resumes the training step that was running from its newest complete checkpoint (and its exact data position).
A step that fails stops the run with the step's name, its log (OUT/logs/<step>.log) and what to do; finished steps
stay as they are. Delete a step's marker to redo it. OUT must be on a file system every node of the cluster shares.

Ray runs the steps: sharding as Ray tasks, each training step as a Ray Train job of `stageN.workers` workers (one GPU
each on a GPU cluster, CPU workers otherwise; restarted up to ray.max_failures times), each evaluation as its own
Ray task (one GPU each when the cluster has GPUs; in parallel as resources allow). Without --ray-address a local
cluster is started for the run; `auto` joins the running one, as under `ray job submit -- videomamba run ...`.

The synthetic demo (configs/demo.yaml, `make demo`) is the recipe with synth.enabled: its own steps make the corpus
(`synth`) and train the tiny teacher (`teacher`) before the general ones.

Examples:
  videomamba run --config configs/demo.yaml --out demo_out
  videomamba run --config configs/recipes/small_1gpu.yaml --out runs/small corpora.videos.input=my/videos.jsonl
  videomamba run --config configs/recipes/videomamba_m_25m.yaml --plan
  videomamba run --config configs/recipes/videomamba_m_5m.yaml --out /shared/runs/m5m --ray-address auto \\
      corpora.webvid.input=s3://bucket/webvid_train.jsonl ...
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

from pipeline.config import RetrievalConfig, VideoTextStageConfig, load_config, read_json, write_resolved
from pipeline.errors import ConfigError
from pipeline.recipe import TRAIN_STEPS, EvalStep, RecipeConfig, TrainStep, clips_per_s, gpu_hours, steps_for
from pipeline.run_report import write_report

# the demo's held-out sets, made by its synth step: (name, annotation file under OUT/corpus/eval/)
DEMO_EVAL_SETS = (("msrvtt", "msrvtt_test.json"), ("msvd", "msvd_test.json"))
# the folder under OUT of each evaluation step's results
EVAL_FOLDERS = {"eval_teacher": "eval", "eval_stage2": "eval_stage2"}


class StepFailed(RuntimeError):
    """A step could not finish; the message says why."""


@dataclass
class Step:
    name: str
    kind: str  # synth | shard | teacher | train | eval
    run: Callable[[], dict]
    plan: Callable[[], dict]  # inputs, samples, steps, gpu_hours (each may be "unknown" or "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/demo.yaml", metavar="RECIPE",
                        help="the recipe (configs/recipes/*.yaml; default: %(default)s)")
    parser.add_argument("--out", default="demo_out",
                        help="the run folder, on a file system every node shares (default: %(default)s)")
    parser.add_argument("--plan", action="store_true",
                        help="print each step's inputs, samples, steps and estimated GPU-hours; train nothing")
    parser.add_argument("--ray-address", default=None, metavar="auto|HOST:PORT",
                        help="the Ray cluster to run on (default: ray.address of the recipe, else a local one)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value",
                        help="overrides of the recipe, e.g. corpora.webvid.input=s3://b/webvid.jsonl "
                             "stage1.workers=8 stage2.overrides='[train.batch_size=64]'")


def run(args: argparse.Namespace) -> int:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("pipeline").setLevel(logging.INFO)
    if "://" in args.out:
        raise ConfigError(f"--out {args.out}: the run folder must be a path on a file system every node shares "
                          "(NFS, Lustre, a mounted bucket): DeepSpeed writes its checkpoints with plain file I/O. "
                          "Corpora, shards and checkpoints to read may be URLs")
    out = os.path.abspath(args.out)
    cfg = with_out(load_config(RecipeConfig, args.config, args.overrides), out)
    cfg.ray.address = args.ray_address or cfg.ray.address  # None: RAY_ADDRESS (ray job submit), else a local one
    recipe_dir = os.path.dirname(os.path.abspath(args.config))
    cluster = Cluster(cfg.ray.address, out)
    steps = pipeline_steps(cfg, recipe_dir, out, cluster)
    if args.plan:
        print(plan_table(cfg, steps))
        return 0
    os.makedirs(os.path.join(out, "steps"), exist_ok=True)
    write_resolved(cfg, os.path.join(out, "run_config.yaml"))
    with cluster:
        for step in steps:
            if not run_step(out, step):
                return 1
    table = write_report(out, cfg.name, [(s.name, s.kind) for s in steps], cfg.paper)
    print(table)
    print(f"videomamba run: all steps complete; outputs under {out} (report.md, report.html)")
    return 0


# ------------------------------------------------------------------------------------------------------ the steps
def pipeline_steps(cfg: RecipeConfig, recipe_dir: str, out: str, cluster: "Cluster") -> list[Step]:
    """The recipe's steps in order. Every stage and evaluation config is loaded (and checked) here, before any work."""
    steps: list[Step] = []
    if cfg.synth.enabled:
        steps.append(Step("synth", "synth", lambda: _synth(cfg, out), lambda: _nothing("the synthetic corpus")))
    used = [name for stage in TRAIN_STEPS if getattr(cfg, stage).config for name in getattr(cfg, stage).corpora]
    for name in dict.fromkeys(used):
        if name not in cfg.corpora:
            raise ConfigError(f"recipe: a training step reads corpus {name!r}, which is not under corpora "
                              f"(there: {', '.join(cfg.corpora) or 'none'})")
        spec = cfg.corpora[name]
        if not spec.shards:
            if not spec.input:
                raise ConfigError(f"recipe: corpora.{name} needs input (a manifest or media folder URL) or shards")
            steps.append(Step(f"shard_{name}", "shard", _bind(_shard, cfg, name, out, cluster),
                              _bind(_shard_plan, cfg, name, out)))
    if cfg.synth.enabled:
        steps.append(Step("teacher", "teacher", lambda: _demo_teacher(cfg, out), lambda: _nothing("synthetic frames")))
        if cfg.stage2.config:
            steps.append(Step("text", "text", lambda: _demo_text(cfg, out), lambda: _nothing("the corpus captions")))
    if cfg.eval_teacher.config:
        teacher_eval = _retrieval_config(cfg, cfg.eval_teacher, recipe_dir, "eval_teacher", _teacher_wiring(cfg))
        steps.append(Step("eval_teacher", "eval", _bind(_evaluate, cfg, teacher_eval, _teacher_checkpoint(cfg), out,
                                                        "eval_teacher", cfg.eval_teacher.gpus, cluster),
                          _bind(_eval_plan, cfg)))
    previous = None
    for name in TRAIN_STEPS:
        spec: TrainStep = getattr(cfg, name)
        if not spec.config:
            continue
        if name == "unmasked" and previous != "stage2":
            raise ConfigError("recipe: unmasked (stage 2's unmasked phase) continues stage 2; set stage2.config")
        stage_config(cfg, name, recipe_dir, out, previous, samples=None)  # checks the keys now
        steps.append(Step(name, "train", _bind(_train, cfg, name, recipe_dir, out, previous, cluster),
                          _bind(_train_plan, cfg, name, recipe_dir, out, previous)))
        previous = name
    if cfg.eval_stage2.config:
        if previous not in ("stage2", "unmasked"):
            raise ConfigError("recipe: eval_stage2 evaluates the stage-2 model; set stage2.config")
        final = _retrieval_config(cfg, cfg.eval_stage2, recipe_dir, "eval_stage2", ["model.kind=videomamba"])
        steps.append(Step("eval_stage2", "eval", _bind(_evaluate, cfg, final, os.path.join(out, previous), out,
                                                       "eval_stage2", cfg.eval_stage2.gpus, cluster),
                          _bind(_eval_plan, cfg)))
    return steps


def run_step(out: str, step: Step) -> bool:
    """Runs a step unless its marker exists; writes the marker when it completes. Returns False (after saying which
    step failed, where its log is and what to do) when it fails; a ConfigError is raised, naming the step."""
    marker = os.path.join(out, "steps", f"{step.name}.json")
    if os.path.exists(marker):
        print(f"[run] {step.name}: complete (skipping; delete {marker} to redo)")
        return True
    print(f"[run] {step.name}: starting", flush=True)
    log_path = os.path.join(out, "logs", f"{step.name}.log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    start = time.time()
    try:
        result = step.run() or {}
    except ConfigError as e:
        _failed(out, step.name, log_path, e)
        raise ConfigError(f"step {step.name}: {e}") from None
    except Exception as e:  # noqa: BLE001 - any failure stops the run with the step's name and log
        _failed(out, step.name, log_path, e)
        train = step.kind == "train"
        where = f"; the training workers' logs are under {out}/{step.name}/ray" if train else ""
        then = f"resumes {step.name} from its newest checkpoint" if train else f"redoes {step.name}"
        print(f"videomamba run: step {step.name} failed: {type(e).__name__}: {e}\n  log: {log_path}{where}\n"
              f"  the steps before it are complete and kept; fix the cause and run the same command again: it skips "
              f"them and {then}", file=sys.stderr, flush=True)
        return False
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    result["seconds"] = round(time.time() - start, 1)
    _write_json(marker, result)
    failed = os.path.join(out, "steps", f"{step.name}.failed.json")
    if os.path.exists(failed):
        os.remove(failed)
    print(f"[run] {step.name}: done in {result['seconds']} s", flush=True)
    return True


def _failed(out: str, name: str, log_path: str, error: BaseException) -> None:
    with open(log_path, "a") as f:
        f.write("".join(traceback.format_exception(type(error), error, error.__traceback__)))
    _write_json(os.path.join(out, "steps", f"{name}.failed.json"),
                {"error": f"{type(error).__name__}: {error}", "log": log_path, "at": time.time()})


def _write_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, default=str)
    os.replace(tmp, path)


def _bind(fn: Callable, *args) -> Callable[[], Any]:
    return lambda: fn(*args)


# ------------------------------------------------------------------------------------------------------ the cluster
class Cluster:
    """The run's Ray connection, made when a step first needs it (a rerun whose steps are complete starts none) and
    closed at the end of the run."""

    def __init__(self, address: Optional[str], out: Optional[str] = None):
        self.address = address
        self.out = out  # the run folder, which every node of the cluster must see
        self._stack = contextlib.ExitStack()
        self._open = False

    def connect(self) -> None:
        if not self._open:
            from pipeline.cluster import ray_connection

            if self.address and self.address != "auto":
                from pipeline.cluster import check_reachable

                check_reachable(self.address)
            self._stack.enter_context(ray_connection(self.address, None))
            self._open = True
            if self.out:
                self._check_shared(self.out)

    def _check_shared(self, out: str) -> None:
        from pipeline.cluster import nodes_not_seeing

        blind = nodes_not_seeing(out)
        if blind:
            self.__exit__()
            raise ConfigError(f"--out {out}: the run folder is not visible on the Ray node(s) {', '.join(blind)}; "
                              "put it on a file system every node mounts (NFS, Lustre, a mounted bucket), "
                              "at the same path on each")

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()
        self._open = False


# ------------------------------------------------------------------------------------------------- recipe helpers
def with_out(cfg: RecipeConfig, out: str) -> RecipeConfig:
    """The recipe with `{out}` in every string replaced by the run folder."""
    def replaced(value: Any) -> Any:
        if isinstance(value, str):
            return value.replace("{out}", out)
        if isinstance(value, list):
            return [replaced(v) for v in value]
        if isinstance(value, dict):
            return {k: replaced(v) for k, v in value.items()}
        if dataclasses.is_dataclass(value):
            return dataclasses.replace(value, **{f.name: replaced(getattr(value, f.name))
                                                 for f in dataclasses.fields(value)})
        return value

    return replaced(cfg)


def recipe_file(path: str, recipe_dir: str) -> str:
    """A YAML a recipe names: relative to the recipe's folder, else to its parent (configs/), else as given."""
    if os.path.isabs(path) or "://" in path:
        return path
    for base in (recipe_dir, os.path.dirname(recipe_dir)):
        candidate = os.path.join(base, path)
        if os.path.exists(candidate):
            return candidate
    return path if os.path.exists(path) else os.path.join(recipe_dir, path)


def corpus_shards(cfg: RecipeConfig, name: str, out: str) -> str:
    """Where a corpus's shards are: as the recipe gives them, or the index its shard step writes."""
    return cfg.corpora[name].shards or os.path.join(out, "shards", name, "index.json")


def corpus_samples(cfg: RecipeConfig, name: str, out: str, look: bool = True) -> Optional[int]:
    """A corpus's sample count: from its shard index when there is one (and `look`), else the recipe's `samples`."""
    index = corpus_shards(cfg, name, out)
    if look and index.endswith(".json") and ("://" in index or os.path.exists(index)):
        try:
            return sum(s["samples"] for s in read_json(index, "shard index")["shards"])
        except (ConfigError, KeyError, TypeError):
            pass
    return cfg.corpora[name].samples


def stage_config(cfg: RecipeConfig, name: str, recipe_dir: str, out: str, previous: Optional[str],
                 samples: Optional[int]):
    """The training step's stage config: its YAML, the recipe's wiring (data, teacher, text encoder, the previous
    step's run as `init`, the run folder), the step's overrides and, with `epochs` and known `samples`, the steps."""
    from pipeline.stages.pretrain import STAGES, stage_name

    spec: TrainStep = getattr(cfg, name)
    path = recipe_file(spec.config, recipe_dir)
    wired = [f"data.train={','.join(corpus_shards(cfg, c, out) for c in spec.corpora)}",
             f"train.out={os.path.join(out, name)}"]
    if not spec.corpora:
        raise ConfigError(f"recipe: {name}.corpora names no corpus")
    if spec.weights is not None:
        if len(spec.weights) != len(spec.corpora):
            raise ConfigError(f"recipe: {name}.weights has {len(spec.weights)} values for {len(spec.corpora)} corpora")
        wired.append(f"data.weights={json.dumps(spec.weights)}")
    if cfg.teacher.model:
        wired.append(f"teacher.model={cfg.teacher.model}")
    if cfg.teacher.pretrained:
        wired.append(f"teacher.pretrained={cfg.teacher.pretrained}")
    if previous:
        wired.append(f"init={os.path.join(out, previous)}")
    if cfg.text.pretrained and name != "stage1":
        wired.append(f"text.pretrained={cfg.text.pretrained}")
    stage = STAGES[stage_name(path, list(spec.overrides))]
    stage_cfg = load_config(stage.config, path, wired + list(spec.overrides))
    if spec.epochs is not None and samples is not None:
        batch = stage_cfg.train.batch_size * stage_cfg.train.grad_accum * max(1, spec.workers)
        stage_cfg.train.max_steps = steps_for(spec.epochs, samples, batch)
        if spec.warmup_epochs is not None:
            stage_cfg.train.warmup_steps = min(stage_cfg.train.max_steps - 1, steps_for(spec.warmup_epochs, samples,
                                                                                         batch))
    return stage, stage_cfg


def _retrieval_config(cfg: RecipeConfig, spec: EvalStep, recipe_dir: str, name: str,
                      wired: list[str]) -> RetrievalConfig:
    if not cfg.evals and not cfg.synth.enabled:
        raise ConfigError(f"recipe: {name} has no evaluation sets: add them under evals (annotations, videos)")
    return load_config(RetrievalConfig, recipe_file(spec.config, recipe_dir), wired + list(spec.overrides))


def _teacher_wiring(cfg: RecipeConfig) -> list[str]:
    """The teacher's evaluation: an open_clip image model, frames mean-pooled; the demo's at its own size."""
    wired = ["model.kind=open_clip"] + ([f"model.name={cfg.teacher.model}"] if cfg.teacher.model else [])
    return wired + ([f"data.img_size={cfg.teacher.img_size}"] if cfg.synth.enabled else [])


def _teacher_checkpoint(cfg: RecipeConfig) -> str:
    if not cfg.teacher.pretrained:
        raise ConfigError("recipe: eval_teacher needs teacher.pretrained (a checkpoint file or an open_clip tag)")
    return cfg.teacher.pretrained


# ------------------------------------------------------------------------------------------------- running steps
def _synth(cfg: RecipeConfig, out: str) -> dict:
    """The demo's corpus: videos.jsonl, images.jsonl and held-out sets under OUT/corpus."""
    from shards.synth import write_corpus

    s = cfg.synth
    return write_corpus(os.path.join(out, "corpus"), videos=s.videos, images=s.images, seed=s.seed, codec=s.codec,
                        size=s.size, frames=s.frames, fps=s.fps, eval_videos=s.eval_videos)


def _demo_teacher(cfg: RecipeConfig, out: str) -> dict:
    """The demo's teacher: a tiny open_clip trained briefly on the synthetic frames, then frozen."""
    from pipeline.stages.teacher_warmup import train_tiny_clip

    path = train_tiny_clip(os.path.join(out, "corpus", "videos.jsonl"), os.path.join(out, "teacher", "tiny_clip.pt"),
                           steps=cfg.teacher.steps, img_size=cfg.teacher.img_size, seed=cfg.teacher.seed)
    return {"checkpoint": str(path)}


def _demo_text(cfg: RecipeConfig, out: str) -> dict:
    """The demo's BERT, built from the training captions (videos and images) of the synthetic corpus."""
    from pipeline.models.text import build_tiny_bert, width_scaled_init_std

    if not cfg.text.pretrained:
        raise ConfigError("recipe: the demo's text step needs text.pretrained (the folder it writes its BERT to)")
    captions = []
    for manifest in ("videos.jsonl", "images.jsonl"):
        with open(os.path.join(out, "corpus", manifest)) as f:
            captions += [c for line in f if line.strip() for c in json.loads(line)["captions"]]
    t = cfg.text
    init_std = t.init_std if t.init_std is not None else width_scaled_init_std(t.hidden)
    path = build_tiny_bert(captions, t.pretrained, hidden=t.hidden, layers=t.layers, heads=t.heads,
                           vocab_size=t.vocab_size, seed=t.seed, initializer_range=init_std, dropout=t.dropout)
    with open(os.path.join(path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return {"bert": str(path), "captions": len(captions), "hidden": t.hidden, "layers": t.layers, "vocab": vocab,
            "init_std": init_std, "dropout": t.dropout}


def _shard(cfg: RecipeConfig, name: str, out: str, cluster: Cluster) -> dict:
    """Shards a corpus into OUT/shards/NAME as Ray tasks; a rerun continues with the shards not written yet."""
    from shards.runner import ShardJobConfig, shard_corpus

    spec = cfg.corpora[name]
    dest = os.path.join(out, "shards", name)
    cluster.connect()
    outcome = shard_corpus(ShardJobConfig(input=spec.input, out=dest,
                                          samples_per_shard=spec.samples_per_shard or cfg.shard.samples_per_shard,
                                          workers=cfg.shard.workers, ray_address=cfg.ray.address))
    if not outcome.ok:
        raise StepFailed(f"sharding {spec.input} left incomplete shards; see {dest}/summary.json")
    return outcome.summary


def _train(cfg: RecipeConfig, name: str, recipe_dir: str, out: str, previous: Optional[str],
           cluster: Cluster) -> dict:
    """A training step: in `workers` Ray Train workers (0: in this process), resuming from the newest complete
    checkpoint of its run folder."""
    spec: TrainStep = getattr(cfg, name)
    samples = _step_samples(cfg, spec, out) if spec.epochs is not None else None
    if spec.epochs is not None and samples is None:
        raise ConfigError(f"{name}.epochs: the sample count of {spec.corpora} is unknown (no shard index); give "
                          f"corpora.NAME.samples or {name}.overrides=[train.max_steps=N] with {name}.epochs=null")
    stage, stage_cfg = stage_config(cfg, name, recipe_dir, out, previous, samples)
    if spec.workers == 0:
        return stage.train(stage_cfg, resume="auto")
    from pipeline.cluster import train_on_ray
    from pipeline.stages.base import with_absolute_paths

    stage.check(stage_cfg)
    cluster.connect()
    return train_on_ray(stage.train, with_absolute_paths(stage_cfg), "auto", spec.workers, cfg.ray.address,
                        max_failures=cfg.ray.max_failures)


def _step_samples(cfg: RecipeConfig, spec: TrainStep, out: str, look: bool = True) -> Optional[int]:
    counts = [corpus_samples(cfg, c, out, look) for c in spec.corpora]
    return None if any(c is None for c in counts) else sum(counts)


def _evaluate(cfg: RecipeConfig, retrieval: RetrievalConfig, checkpoint: str, out: str, name: str,
              gpus: Optional[float], cluster: Cluster) -> dict:
    """Every evaluation set, each as its own Ray task (in parallel as the cluster allows); a set whose result is
    there from an earlier attempt is not redone. Returns per set its counts and metrics."""
    from pipeline.cluster import run_tasks

    folder = os.path.join(out, EVAL_FOLDERS[name])
    results, todo = {}, []
    for set_name, spec in eval_sets(cfg, out).items():
        done = os.path.join(folder, f"retrieval_{set_name}.json")
        if os.path.exists(done):
            with open(done) as f:
                results[set_name] = _eval_summary(json.load(f))
        else:
            todo.append((set_name, spec))
    if todo:
        cluster.connect()
        calls = [(retrieval, checkpoint, spec.dataset or set_name, spec.annotations, spec.videos, folder, set_name)
                 for set_name, spec in todo]
        failures = []
        for (set_name, _), outcome in zip(todo, run_tasks(evaluate_set, calls, gpus, cfg.ray.task_retries)):
            if isinstance(outcome, BaseException):
                failures.append(f"{set_name}: {type(outcome).__name__}: {outcome}")
            else:
                results[set_name] = outcome
        if failures:
            raise StepFailed("evaluations failed (the others are kept): " + "; ".join(failures))
    return {k: results[k] for k in eval_sets(cfg, out)}


def eval_sets(cfg: RecipeConfig, out: str) -> dict:
    """The recipe's evaluation sets; the demo's are the held-out sets its synth step writes."""
    if cfg.evals or not cfg.synth.enabled:
        return cfg.evals
    from pipeline.recipe import EvalSetSpec

    folder = os.path.join(out, "corpus", "eval")
    return {name: EvalSetSpec(os.path.join(folder, file), os.path.join(folder, "videos"), name)
            for name, file in DEMO_EVAL_SETS}


def evaluate_set(retrieval: RetrievalConfig, checkpoint: str, dataset: str, annotations: str, videos: str,
                 folder: str, set_name: str) -> dict:
    """One evaluation (a Ray task): writes FOLDER/retrieval_<set_name>.* (json, md, png, ...) and returns its
    summary. The files are written aside and moved in place when complete, so a rerun redoes only the sets that have
    no result."""
    from pipeline.eval.report import result_markdown
    from pipeline.stages.retrieval import evaluate_retrieval

    aside = os.path.join(folder, f".tmp_{set_name}")
    result = evaluate_retrieval(retrieval, checkpoint, dataset, annotations, videos, aside, progress=False)
    for file_name in sorted(os.listdir(aside), key=lambda n: n.endswith(".json")):  # the .json, its marker, last
        os.replace(os.path.join(aside, file_name),
                   os.path.join(folder, file_name.replace(f"retrieval_{dataset}", f"retrieval_{set_name}", 1)))
    os.rmdir(aside)
    print(result_markdown(result), flush=True)
    return _eval_summary(result)


def _eval_summary(result: dict) -> dict:
    """What the marker and the report keep of an evaluation: counts, chance level and the final recalls in % both
    ways (re-ranked when the model has a matching head, else contrastive), under `scores`."""
    counts = result["counts"]
    scores = "reranked" if "reranked" in result["metrics"] else "contrastive"
    metrics = result["metrics"][scores]
    summary = {"dataset": result["dataset"], "videos": counts["videos_evaluated"], "texts": counts["texts_evaluated"],
               "skipped": counts["videos_skipped"], "chance_r1": result["chance_r1"], "scores": scores,
               "t2v": {f"R@{k}": metrics[f"img_r{k}"] for k in (1, 5, 10)},
               "v2t": {f"R@{k}": metrics[f"txt_r{k}"] for k in (1, 5, 10)}}
    if scores == "reranked":  # what the re-ranking changed: the contrastive scores' R@1 beside it
        contrastive = result["metrics"]["contrastive"]
        summary["contrastive_r1"] = {"t2v": contrastive["img_r1"], "v2t": contrastive["txt_r1"]}
    return summary


# -------------------------------------------------------------------------------------------------------- the plan
def _nothing(what: str) -> dict:
    return {"inputs": what, "samples": "-", "steps": "-", "gpu_hours": "-"}


def _size(url: str, look: bool) -> str:
    """A local input's size (a file's bytes, a folder's entry count), or "unknown" (URLs are not listed)."""
    if not look or "://" in url or not os.path.exists(url):
        return "unknown"
    if os.path.isdir(url):
        return f"{len(os.listdir(url))} entries"
    return f"{os.path.getsize(url) / 1e6:.1f} MB"


def _shard_plan(cfg: RecipeConfig, name: str, out: str) -> dict:
    spec = cfg.corpora[name]
    samples = corpus_samples(cfg, name, out, cfg.plan.list_sizes)
    return {"inputs": f"{spec.input} ({_size(spec.input, cfg.plan.list_sizes)})",
            "samples": samples if samples is not None else "unknown", "steps": "-",
            "gpu_hours": "- (CPU tasks)"}


def _train_plan(cfg: RecipeConfig, name: str, recipe_dir: str, out: str, previous: Optional[str]) -> dict:
    spec: TrainStep = getattr(cfg, name)
    samples = _step_samples(cfg, spec, out, look=cfg.plan.list_sizes)
    _, stage_cfg = stage_config(cfg, name, recipe_dir, out, previous, samples)
    inputs = ", ".join(f"{c} ({_count(corpus_samples(cfg, c, out, cfg.plan.list_sizes))} samples"
                       f"{', weight ' + str(w) if spec.weights else ''})"
                       for c, w in zip(spec.corpora, spec.weights or [None] * len(spec.corpora)))
    if previous:
        inputs += f"; init: {previous}"
    if spec.epochs is not None and samples is None:
        return {"inputs": inputs, "samples": "unknown", "steps": f"{spec.epochs} epochs of unknown", "gpu_hours":
                "unknown"}
    batch = stage_cfg.train.batch_size * stage_cfg.train.grad_accum * max(1, spec.workers)
    clips = stage_cfg.train.max_steps * batch
    model = stage_cfg.model
    kind = "stage2" if isinstance(stage_cfg, VideoTextStageConfig) else "stage1"
    rate, priced_by = (None, "") if (model.depth or model.embed_dim) else clips_per_s(
        kind, stage_cfg.mask.ratio > 0, model.size, stage_cfg.data.num_frames, cfg.plan.gpu)
    hours = gpu_hours(clips, rate)
    steps = f"{stage_cfg.train.max_steps:,} x {batch} clips" + (f" ({spec.epochs} epochs)" if spec.epochs else "")
    shown = "unknown (throughput not measured for this model)" if hours is None else (
        f"{hours:,.2f} ({hours / max(1, spec.workers):,.2f} h on {max(1, spec.workers)} GPU"
        f"{'s' if spec.workers > 1 else ''}; {priced_by} {rate:g} clips/s)")
    return {"inputs": inputs, "samples": samples if samples is not None else "unknown", "steps": steps,
            "gpu_hours": shown, "model": f"VideoMamba-{model.size} {stage_cfg.data.num_frames}x"
                                         f"{stage_cfg.data.img_size}²"}


def _count(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n:,}"


def _eval_plan(cfg: RecipeConfig) -> dict:
    sets = ", ".join(f"{name} ({spec.annotations}: {_size(spec.annotations, cfg.plan.list_sizes)})"
                     for name, spec in cfg.evals.items()) or "the synthetic held-out sets"
    return {"inputs": sets, "samples": "-", "steps": "-", "gpu_hours": f"small ({len(cfg.evals) or 2} tasks)"}


def plan_table(cfg: RecipeConfig, steps: list[Step]) -> str:
    """The plan as markdown: per step its inputs (and sizes), samples, steps and estimated GPU-hours."""
    lines = [f"Plan of recipe {cfg.name or '(unnamed)'} (GPU-hours at the clips/s measured on the {cfg.plan.gpu} in "
             "bench/RESULTS.md: the whole masked step where measured, else the backbone's; pipeline.recipe)", "",
             "| step | inputs | samples | steps | est. GPU-hours |", "|---|---|---:|---|---:|"]
    total = 0.0
    for step in steps:
        p = step.plan()
        lines.append(f"| {step.name} | {p['inputs']}{' [' + p['model'] + ']' if 'model' in p else ''} | "
                     f"{p['samples'] if isinstance(p['samples'], str) else format(p['samples'], ',')} | "
                     f"{p['steps']} | {p['gpu_hours']} |")
        if step.kind == "train" and p["gpu_hours"][:1].isdigit():
            total += float(p["gpu_hours"].split(" ")[0].replace(",", ""))
    lines += ["", f"Training total: {total:,.2f} GPU-hours (the steps priced above). A masked step is priced by the "
              "whole step measured at the paper's setting (teacher, mask, text side) where it was measured; the rest "
              "by the backbone's step on every token, which leaves out the teacher and the text model."]
    return "\n".join(lines)
