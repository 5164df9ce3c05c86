"""The summary and the printed table of ``python -m benchmarks speed``: ratios, targets, contamination."""

from __future__ import annotations

from .synthetic import LARGE_SIZE, SMALL_SIZE

TARGETS = {"a_over_b": 0.90, "a_over_c": 1.0, "freeze_speedup": 2.5, "draft_speedup": 3.0}
LOAD_LIMIT = 1.5            # 1-minute load average above which timings are called contaminated
FOREIGN_CPU_LIMIT = 0.25    # cores used by other processes during a job, on average
UNCACHED, CACHED = "freeze (train_bn=False, augment=False), no cache", "freeze (train_bn=False, augment=False), cached"


def aggregate(epochs: list[dict]) -> dict:
    """Images/s over several timed epochs (all their images / all their time) and the per-epoch spread."""
    images = sum(e["train_images"] for e in epochs)
    seconds = sum(e["epoch_time_s"] for e in epochs)
    rates = [e["images_per_s"] for e in epochs]
    return {"images_per_s": images / seconds, "epoch_time_s": seconds / len(epochs), "train_images": images,
            "epochs": [e["epoch"] for e in epochs], "min_images_per_s": min(rates), "max_images_per_s": max(rates)}


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def summarize(results: dict, args) -> dict:
    w, t = args.warmup_epochs, args.timed_epochs
    a_run, b_run, c_run = results["a_trainer_no_freeze"], results["b_bare"], results["c_plain_accelerate"]
    a, b, c = aggregate(a_run["epochs"][w:w + t]), aggregate(b_run["epochs"]), aggregate(c_run["epochs"][w:w + t])
    a["first_epoch_images_per_s"] = a_run["epochs"][0]["images_per_s"]
    a["num_workers"] = a_run["num_workers"]
    c["first_epoch_images_per_s"] = c_run["epochs"][0]["images_per_s"]
    c["num_workers"] = c_run["num_workers"]
    b["predecode_s"] = b_run["predecode_s"]
    a_default = aggregate(results["a_default_malloc"]["epochs"][w:w + t])
    throughput = {"a_trainer": a, "b_bare": b, "c_plain_accelerate": c, "a_default_malloc": a_default}
    a_over_b = a["images_per_s"] / b["images_per_s"]
    a_over_c = a["images_per_s"] / c["images_per_s"]

    def row(run: dict, epochs: list[dict], peak_rss: float, peak_gpu) -> dict:
        workers = [e.get("workers_uss_mib_at_end") for e in epochs]
        return {**aggregate(epochs), "wall_with_val_s": sum(e["wall_with_val_s"] for e in epochs) / len(epochs),
                "peak_rss_mib": peak_rss, "rss_before_finetune_mib": run["rss_before_finetune_mib"],
                "peak_gpu_mib": peak_gpu, "workers_uss_mib": max(filter(None, workers), default=None),
                "setup_s": run["setup_s"]}

    strategies = {}
    for key, label in (("a_trainer_no_freeze", "no_freeze"), ("s_freeze", "freeze (train_bn=False)"),
                       ("s_freeze_train_bn", "freeze (train_bn=True, as Flash)"),
                       ("f_no_cache", UNCACHED), ("f_cache", CACHED)):
        run = results[key]
        strategies[label] = row(run, run["epochs"][w:w + t], run["peak_rss_mib"], run["peak_gpu_mib"])
    fu = results["s_freeze_unfreeze"]
    frozen, unfrozen = fu["epochs"][w:w + t], fu["epochs"][w + t:w + 2 * t]
    gpu_peak = (lambda es: max(e["peak_gpu_mib"] for e in es) if es[0]["peak_gpu_mib"] is not None else None)
    # phase 1: ru_maxrss read at the hook that starts the first unfrozen epoch (nothing unfrozen ran yet)
    strategies["freeze_unfreeze phase 1 (frozen, train_bn=False)"] = row(
        fu, frozen, frozen[-1]["peak_rss_mib_to_end"], gpu_peak(frozen))
    strategies["freeze_unfreeze phase 2 (unfrozen)"] = row(fu, unfrozen, fu["peak_rss_mib"], gpu_peak(unfrozen))

    no_freeze, freeze = strategies["no_freeze"], strategies["freeze (train_bn=False)"]
    freeze_speedup = freeze["images_per_s"] / no_freeze["images_per_s"]
    freeze_bn_speedup = strategies["freeze (train_bn=True, as Flash)"]["images_per_s"] / no_freeze["images_per_s"]
    phase_speedup = (strategies["freeze_unfreeze phase 1 (frozen, train_bn=False)"]["images_per_s"]
                     / strategies["freeze_unfreeze phase 2 (unfrozen)"]["images_per_s"])
    rss_saving = no_freeze["peak_rss_mib"] - freeze["peak_rss_mib"]
    decode = results["decode"]

    cached, uncached = strategies[CACHED], strategies[UNCACHED]
    feature_cache = {"used": results["f_cache"]["feature_cache_used"],  # epoch 0, which encodes, is untimed
                     "train_speedup": uncached["epoch_time_s"] / cached["epoch_time_s"],
                     "epoch_speedup": uncached["wall_with_val_s"] / cached["wall_with_val_s"],
                     "first_epoch_s": {label: results[key]["epochs"][0]["wall_with_val_s"]
                                       for key, label in (("f_cache", "cached"), ("f_no_cache", "uncached"))}}
    targets = [
        {"name": "a/b (Trainer / bare loop)", "value": a_over_b, "target": f">= {TARGETS['a_over_b']:.2f}",
         "pass": a_over_b >= TARGETS["a_over_b"], "by": a_over_b - TARGETS["a_over_b"]},
        {"name": "a/c (Trainer / plain Accelerate)", "value": a_over_c, "target": f">= {TARGETS['a_over_c']:.2f}",
         "pass": a_over_c >= TARGETS["a_over_c"], "by": a_over_c - TARGETS["a_over_c"]},
        {"name": "freeze speedup over no_freeze (train_bn=False)", "value": freeze_speedup,
         "target": f">= {TARGETS['freeze_speedup']:.1f}x and lower peak RSS (saves {rss_saving:.0f} MiB)",
         "pass": freeze_speedup >= TARGETS["freeze_speedup"] and rss_saving > 0,
         "by": freeze_speedup - TARGETS["freeze_speedup"]},
        {"name": f"draft decode speedup ({args.image_size} px eval path, loader worker)", "value": decode["speedup"],
         "target": f">= {TARGETS['draft_speedup']:.1f}x", "pass": decode["speedup"] >= TARGETS["draft_speedup"],
         "by": decode["speedup"] - TARGETS["draft_speedup"]},
    ]
    return {"throughput": throughput, "a_over_b": a_over_b, "a_over_c": a_over_c,
            "a_over_default_malloc": a["images_per_s"] / a_default["images_per_s"], "predict": results["p_predict"],
            "strategies": strategies,
            "freeze_speedup": freeze_speedup, "freeze_train_bn_speedup": freeze_bn_speedup,
            "freeze_unfreeze_phase_speedup": phase_speedup, "freeze_rss_saving_mib": rss_saving,
            "feature_cache": feature_cache, "decode": decode, "targets": targets}


def format_report(report: dict) -> str:
    s, summary, ds = report["settings"], report["summary"], report["dataset"]
    lines: list[str] = []
    add = lines.append
    w, t = s["warmup_epochs"], s["timed_epochs"]
    add(f"dist_finetune benchmark: {s['backbone']}, {s['image_size']} px, batch {s['batch_size']}, "
        f"precision {s['mixed_precision']}{', torch.compile' if s['compile'] else ''}, device {report['environment']['device_name']}"
        + ("  [QUICK: smoke-test sizes, figures not meaningful]" if s["quick"] else ""))
    add(f"data: {ds['train']['images']} train JPEGs ({s['num_large']} of {LARGE_SIZE[0]}x{LARGE_SIZE[1]}, mean "
        f"{ds['large_jpeg']['mean_kib']:.0f} KiB; the rest {SMALL_SIZE[0]}x{SMALL_SIZE[1]} or portrait, mean "
        f"{ds['small_jpeg']['mean_kib']:.0f} KiB), {ds['val']['images']} val; {ds['root']}")
    add(f"timing: epochs {w}..{w + t - 1} ({t} timed) after {w} untimed warm-up epoch(s); epoch 0 also pays for "
        "starting loader workers and first allocations. (b): 2 untimed warm-up steps, then the same epochs.")
    add("")
    tp = summary["throughput"]
    add(f"{'throughput':<46}{'img/s':>9}{'epoch s':>10}   {'per-epoch range':<17}notes")

    def spread(r: dict) -> str:
        return f"{r['min_images_per_s']:.2f}-{r['max_images_per_s']:.2f}"

    a, b, c = tp["a_trainer"], tp["b_bare"], tp["c_plain_accelerate"]
    add(f"{'(a) dist_finetune Trainer, no_freeze':<46}{a['images_per_s']:>9.2f}{a['epoch_time_s']:>10.2f}   "
        f"{spread(a):<17}epoch 0: {a['first_epoch_images_per_s']:.2f} img/s; {a['num_workers']} loader worker(s)")
    ad = tp["a_default_malloc"]
    label = "(a') the same, glibc's default malloc"
    add(f"{label:<46}{ad['images_per_s']:>9.2f}{ad['epoch_time_s']:>10.2f}   "
        f"{spread(ad):<17}a/a' = {summary['a_over_default_malloc']:.2f} (tune_cpu_allocator=False; "
        f"{'every row is so' if s['default_malloc'] else 'the other rows keep freed memory'})")
    add(f"{'(b) bare PyTorch, in-memory uint8 tensors':<46}{b['images_per_s']:>9.2f}{b['epoch_time_s']:>10.2f}   "
        f"{spread(b):<17}upper bound: no decoding, no loader")
    add(f"{'(c) plain Accelerate (cv_example style)':<46}{c['images_per_s']:>9.2f}{c['epoch_time_s']:>10.2f}   "
        f"{spread(c):<17}epoch 0: {c['first_epoch_images_per_s']:.2f} img/s; {c['num_workers']} loader worker(s), "
        "full-size decode")
    p = summary["predict"]
    add(f"{'(p) prediction pipeline (predict_to_file)':<46}{p['predict_images_per_s']:>9.2f}{p['predict_s']:>10.2f}   "
        f"{'':<17}in-process, {p['images']} JPEGs to a CSV; {p['num_workers']} loader worker(s)")
    add(f"{'(q) bare inference, in-memory uint8 tensors':<46}{p['bare_images_per_s']:>9.2f}{p['bare_s']:>10.2f}   "
        f"{'':<17}p/q = {p['predict_over_bare']:.2f}; eval mode, inference_mode, same batch and precision")
    add("")
    gpu = report["environment"]["device"] == "cuda"
    add(f"{'strategy (a fresh process each)':<50}{'epoch s':>9}{'img/s':>9}{'vs no_freeze':>14}{'peak RSS MiB':>14}"
        f"{'workers MiB':>13}" + (f"{'peak GPU MiB':>14}" if gpu else ""))
    base = summary["strategies"]["no_freeze"]["images_per_s"]
    for label, r in summary["strategies"].items():
        workers = r["workers_uss_mib"]
        add(f"{label:<50}{r['epoch_time_s']:>9.2f}{r['images_per_s']:>9.2f}{r['images_per_s'] / base:>13.2f}x"
            f"{r['peak_rss_mib']:>14.0f}{(f'{workers:.0f}' if workers is not None else 'n/a'):>13}"
            + (f"{r['peak_gpu_mib'] or 0:>14.0f}" if gpu else ""))
    before = summary["strategies"]["no_freeze"]["rss_before_finetune_mib"]
    add(f"  peak RSS: the training process (ru_maxrss); {before:.0f}"
        " MiB of it is interpreter + libraries + model before finetune(). workers: unique memory (USS) of")
    add("  the live loader workers (the persistent train ones; val workers exit after each validation) at the end of"
        " the phase's last epoch.")
    fc, first = summary["feature_cache"], summary["feature_cache"]["first_epoch_s"]
    add(f"  frozen-feature cache{'' if fc['used'] else ' (NOT USED)'}: {fc['train_speedup']:.1f}x per epoch's training "
        f"loop, {fc['epoch_speedup']:.2f}x with validation (which runs the backbone); its epoch 0 encodes the train")
    add(f"  images: {first['cached']:.2f} s with validation (no cache: {first['uncached']:.2f} s)")
    add("")
    d, cpu = summary["decode"], "{user:.1f}+{system:.1f}".format_map
    add(f"{'JPEG decode + eval transform, 1 persistent DataLoader worker':<62}{'full':>8}{'draft':>8}{'speedup':>9}"
        f"   img/s; worker CPU ms/image, user+system; {d['num_large']} JPEGs of {'x'.join(map(str, d['full_size']))}")
    for size, r in d["eval_sizes"].items():
        label = f"  {size} px (resize {r['resize']}, crop): draft min_side={r['resize']} -> " + "x".join(
            map(str, r["draft_size"]))
        add(f"{label:<62}{r['full_images_per_s']:>8.1f}{r['draft_images_per_s']:>8.1f}{r['speedup']:>8.2f}x   "
            f"full {cpu(r['full_ms'])}, draft {cpu(r['draft_ms'])}: {r['user_cpu_speedup']:.2f}x in user CPU")
    add("  decode alone, 1 thread, ms/image (user+system CPU): " + ", ".join(
        f"{'full' if r['scale'] == 1 else '1/' + str(r['scale'])} {'x'.join(map(str, r['decoded_size']))} "
        f"{r['wall']:.1f} ({cpu(r)})" for r in d["decode_only"]))
    add("  system CPU: page faults on fresh decode buffers; how often glibc malloc re-faults them varies between "
        "processes, and with it the full decode's time")
    add("  pixel difference, draft vs full after the transform: " + "; ".join(
        f"{size} px mean |d| {r['mean_abs_diff']:.2f}/255 (max {r['max_abs_diff']})"
        for size, r in d["eval_sizes"].items()))
    pipe = d["train_pipeline_images_per_s"]
    add(f"  training datasets alone (decode + train transforms per sample, {d['pipeline_images']} train images, "
        f"1 thread): dist_finetune {pipe['library_dataset']:.1f} img/s, plain (c) {pipe['plain_dataset']:.1f} img/s")
    add("")
    add(f"{'target':<56}{'measured':>10}   {'goal':<48}result")
    for target in summary["targets"]:
        add(f"{target['name']:<56}{target['value']:>10.2f}   {target['target']:<48}{verdict(target['pass'])} "
            f"({target['by']:+.2f})")
    small = d["eval_sizes"][str(d["small_eval_size"])]
    add(f"  draft decode: entropy decoding of the whole file is a floor no DCT scale removes: decoding alone at 1/8 "
        f"scale saves only {d['draft_ceiling']:.2f}x user CPU; at {d['small_eval_size']} px (1/8 scale) the loader "
        f"speedup is {small['speedup']:.2f}x ({small['user_cpu_speedup']:.2f}x in user CPU)")
    add(f"  also: freeze with train_bn=True (Flash's and BaseFinetuning's default) is {summary['freeze_train_bn_speedup']:.2f}x "
        f"no_freeze; freeze_unfreeze phase 1 is {summary['freeze_unfreeze_phase_speedup']:.2f}x its phase 2")
    add("")
    cont = report["contamination"]
    add(f"machine load: 1-min load average {cont['load_at_start']:.2f} at start (limit {LOAD_LIMIT}); other "
        f"processes used up to {cont['max_foreign_cores']:.2f} cores during a job (limit {FOREIGN_CPU_LIMIT}) -> "
        + ("CONTAMINATED: timings are not reliable" if cont["contaminated"] else "clean"))
    return "\n".join(lines)
