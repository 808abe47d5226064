"""Which per-case score picks the real CTs whose contours went wrong? And what does the region-aware fusion change?

Uses the six ``_cpuRealCT`` models of ``benchmarks/real_ct.py`` (``--stages dataset plan train --our-folds 0 1``,
same ``--work``), on 40 held-out real CTs, each segmented only by models that never saw it: fold 0's and fold 1's 12
validation CTs by that fold's three models, the 16 test CTs by all six.

1. ``predict``: one ``gtv-predict`` run per set of CTs (real_ct.py's inference settings and fusion rule: Local
   weight 0.5, largest component; each model's output kept), fused the region-aware way (gtv-predict's default,
   ``--outside-region abstain``); then ``gtv-uncertainty`` re-fuses the same saved outputs with
   ``--outside-region background`` (the rule of docs/results/real_ct.md, before region-aware fusion).
2. ``scores``: every review score of the region-aware runs' ``summary.csv`` against 1 - Dice
   (``nnunetv2_gtv.evaluation.review_scores``: Spearman rho and AUROC for the worst quarter with bootstrap 95 %
   intervals, how many of the worst quarter a review of the riskiest quarter catches, and the size-only baseline)
   on the 24 validation CTs, where the score is chosen (highest AUROC), then on the 16 test CTs and all 40.
3. ``fusion``: the two outside-region rules side by side on the same CTs (mean Dice, paired Wilcoxon test), the
   16 test CTs (nothing chosen on them) and the 24 validation CTs.
4. ``synthetic`` (with ``--demo-work``, the working folder of ``setup_scripts/run_demo.sh``): the demo's three
   models fused by gtv-predict on 40 new synthetic CTs drawn like the demo's (``gtv-synthetic --seed 77``; the demo
   draws with seed 0), and every score validated there.

Results go to ``DIR/review_scores.json`` and markdown on stdout. Nothing is trained here.

    python benchmarks/review_scores.py --work DIR [--stages predict scores fusion]
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

import real_ct
from common import load_average, logger, run_stages, work_folders

STAGES = ("predict", "scores", "fusion", "synthetic")
SYNTHETIC_CASES, SYNTHETIC_SEED, DEMO_DATASET = 40, 77, "990"
FOLDS = (0, 1)
# real_ct.py's fusion rule, chosen there on fold 0's validation CTs (docs/results/real_ct.md); fixed here
FUSION_RULE = "Local weight 0.5, largest component"
OUTSIDE_REGION_RULES = {"region-aware (abstain)": "abstain", "background outside the region (before)": "background"}
log = logger("review_scores")


def case_sets(dirs: dict) -> dict[str, tuple[Path, Path, list[str], list[str]]]:
    """Name -> (images, labels, cases, models) of each set of held-out CTs."""
    raw = dirs["nnUNet_raw"] / real_ct.DATASET
    sets = {f"fold {fold} validation": (real_ct.validation_images(dirs, fold), raw / "labelsTr",
                                        real_ct.validation_cases(dirs, fold), real_ct.our_specs([fold]))
            for fold in FOLDS}
    test_cases = sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz"))
    sets["test"] = (raw / "imagesTs", raw / "labelsTs", test_cases, real_ct.our_specs(list(FOLDS)))
    return sets


def output_folder(dirs: dict, set_name: str, rule: str) -> Path:
    return dirs["work"] / "review_scores" / f"{set_name.replace(' ', '_')}_{OUTSIDE_REGION_RULES[rule]}"


def stage_predict(dirs: dict, record: dict) -> None:
    aware, before = OUTSIDE_REGION_RULES
    for set_name, (images, _, _, specs) in case_sets(dirs).items():
        fused = output_folder(dirs, set_name, aware)
        fused.parent.mkdir(parents=True, exist_ok=True)
        options = real_ct.fusion_options(FUSION_RULE, specs)
        load_before, start = load_average(), time.perf_counter()
        if real_ct.predict_ensemble(dirs, images, fused, specs, options):
            record.setdefault("predict", {})[set_name] = {"seconds": time.perf_counter() - start,
                                                          "load": [load_before, load_average()]}
        background = output_folder(dirs, set_name, before)
        if not (background / "summary.json").is_file():
            real_ct.fuse_saved_outputs(real_ct.model_prediction_folders(fused, specs), background,
                                       [*options, "--outside-region", "background"])


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def set_scores(dirs: dict, rule: str) -> dict[str, tuple[list[dict], dict[str, float]]]:
    """Set name -> (summary rows, case -> fused Dice) of one outside-region rule."""
    result = {}
    for set_name, (_, labels, cases, _) in case_sets(dirs).items():
        folder = output_folder(dirs, set_name, rule)
        dice = {case: s["dice"] for case, s in real_ct.dice_against_labels(folder, labels, cases).items()}
        result[set_name] = ([row for row in read_rows(folder) if row["case"] in dice], dice)
    return result


def stage_scores(dirs: dict, record: dict) -> None:
    from nnunetv2_gtv.evaluation.review_scores import calibrate_review, validate_scores

    per_set = set_scores(dirs, next(iter(OUTSIDE_REGION_RULES)))
    validation = [f"fold {f} validation" for f in FOLDS]
    groups = {"validation (24 CTs, where the score is chosen)": validation, "test (16 CTs)": ["test"],
              "all 40 held-out CTs": [*validation, "test"]}
    results, pooled = {}, {}
    for group, names in groups.items():
        rows = [row for name in names for row in per_set[name][0]]
        dice = {case: d for name in names for case, d in per_set[name][1].items()}
        pooled[group] = rows, dice
        results[group] = {"cases": len(dice), "mean_dice": statistics.fmean(dice.values()),
                          "scores": validate_scores(rows, dice)}
    calibration = calibrate_review(*pooled["validation (24 CTs, where the score is chosen)"])
    record["scores"] = {"groups": results, "chosen_on_validation": calibration and calibration["score"],
                        "calibration": calibration,
                        "flag_on_test": calibration and flag_on(calibration, *pooled["test (16 CTs)"])}
    log(f"chosen on the validation CTs: {calibration and calibration['score']}")


def flag_on(calibration: dict, rows: list[dict], dice: dict[str, float]) -> dict:
    """The review flag calibrated on the validation CTs (gtv-postprocessing's rule) applied to other CTs: how many
    it flags, and how many of their worst quarter (lowest Dice) are among them."""
    import math

    from nnunetv2_gtv.ensemble.review_ranking import ReviewSelection
    from nnunetv2_gtv.ensemble.summary import label_columns
    from nnunetv2_gtv.evaluation.review_scores import case_risks

    selection = ReviewSelection(calibration["score"], threshold=calibration["threshold"], source="validation CTs")
    risks = case_risks(rows, selection.score, label_columns(rows))
    flagged = {case for case, case_risk in risks.items() if case in dice and selection.flags(case_risk)}
    worst = set(sorted(dice, key=lambda case: (dice[case], case))[:math.ceil(len(dice) / 4)])
    return {"cases": len(dice), "flagged": sorted(flagged), "worst_quarter": sorted(worst),
            "worst_flagged": len(worst & flagged)}


def stage_fusion(dirs: dict, record: dict) -> None:
    from scipy import stats

    by_rule = {rule: set_scores(dirs, rule) for rule in OUTSIDE_REGION_RULES}
    comparison = {}
    for group, names in {"test (16 CTs)": ["test"],
                         "validation (24 CTs)": [f"fold {f} validation" for f in FOLDS]}.items():
        dice = {rule: {c: d for name in names for c, d in by_rule[rule][name][1].items()} for rule in by_rule}
        aware, before = (dice[rule] for rule in OUTSIDE_REGION_RULES)
        cases = sorted(aware)
        differences = [aware[c] - before[c] for c in cases]
        test = stats.wilcoxon(differences) if any(differences) else None
        comparison[group] = {"mean_dice": {rule: statistics.fmean(d.values()) for rule, d in dice.items()},
                             "better": sum(d > 0 for d in differences), "worse": sum(d < 0 for d in differences),
                             "wilcoxon_p": None if test is None else float(test.pvalue), "per_case": dice}
    record["fusion"] = comparison


def stage_synthetic(dirs: dict, record: dict, demo_work: Path) -> None:
    from nnunetv2_gtv.evaluation.review_scores import validate_scores

    raw = dirs["work"] / "review_scores" / "synthetic_raw"
    images = raw / "Dataset991_SyntheticReview"
    if not (images / "dataset.json").is_file():
        real_ct.run([real_ct.nnunet_command("gtv-synthetic"), "-o", str(raw), "-d", "991", "-n", "SyntheticReview",
                     "--num-train", "1", "--num-test", str(SYNTHETIC_CASES), "--size", "128", "--slices", "44",
                     "--in-plane-mm", "1.6", "1.9", "--orientations", "mixed", "--seed", str(SYNTHETIC_SEED)],
                    dirs["logs"] / "review_synthetic_data.log")
    fused = dirs["work"] / "review_scores" / "synthetic_fused"
    if not (fused / "summary.json").is_file():
        real_ct.run([real_ct.nnunet_command("gtv-predict"), "-i", str(images / "imagesTs"), "-o", str(fused), "-d",
                     DEMO_DATASET, "-m", "Local:0", "Middle:0", "Global:0", "-tr_suffix", "_cpu", "-device", "cpu",
                     "--disable_progress_bar"], dirs["logs"] / "review_synthetic_predict.log",
                    dict(os.environ, nnUNet_results=str(demo_work.resolve() / "nnUNet_results")))
    cases = sorted(p.name[:-len(".nii.gz")] for p in (images / "labelsTs").glob("*.nii.gz"))
    dice = {case: s["dice"] for case, s in real_ct.dice_against_labels(fused, images / "labelsTs", cases).items()}
    record["synthetic"] = {"cases": len(dice), "mean_dice": statistics.fmean(dice.values()),
                           "scores": validate_scores(read_rows(fused), dice)}


def markdown(record: dict) -> str:
    lines = []
    groups = dict(record.get("scores", {}).get("groups", {}))
    if "synthetic" in record:
        groups[f"synthetic, the demo's three models ({record['synthetic']['cases']} new CTs)"] = record["synthetic"]
    if groups:
        for group, result in groups.items():
            lines += [f"### {group}: fused mean Dice {result['mean_dice']:.3f}", "",
                      "| score | Spearman rho [95 % CI] | AUROC, worst quarter [95 % CI] | worst quarter caught |",
                      "|---|---|---|---|"]
            for score, v in result["scores"].items():
                lines.append(f"| {score} | {v['spearman_rho']:.2f} [{v['rho_interval'][0]:.2f}, "
                             f"{v['rho_interval'][1]:.2f}] | {v['auroc']:.2f} [{v['auroc_interval'][0]:.2f}, "
                             f"{v['auroc_interval'][1]:.2f}] | {v['caught']} of {v['worst']} |")
            lines.append("")
        if "scores" in record:
            lines.append(f"Chosen on the validation CTs: **{record['scores']['chosen_on_validation']}**.\n")
            flag, calibration = record["scores"]["flag_on_test"], record["scores"]["calibration"]
            if flag:
                lines.append(f"Flag calibrated on them ({calibration['score']}, threshold "
                             f"{calibration['threshold']:.4g}) on the {flag['cases']} test CTs: {len(flag['flagged'])} "
                             f"flagged, {flag['worst_flagged']} of the {len(flag['worst_quarter'])} worst among them.\n")
    if "fusion" in record:
        lines += ["| CTs | " + " | ".join(OUTSIDE_REGION_RULES) + " | better / worse | Wilcoxon p |",
                  "|---|---|---|---|---|"]
        for group, c in record["fusion"].items():
            p = "–" if c["wilcoxon_p"] is None else f"{c['wilcoxon_p']:.3g}"
            lines.append(f"| {group} | " + " | ".join(f"{c['mean_dice'][rule]:.3f}" for rule in OUTSIDE_REGION_RULES)
                         + f" | {c['better']} / {c['worse']} | {p} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="benchmarks/real_ct.py's working folder")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES[:3]))
    parser.add_argument("--demo-work", type=Path, help="run_demo.sh's working folder (its three trained models), "
                                                        "for the synthetic stage")
    args = parser.parse_args(argv)
    if "synthetic" in args.stages and args.demo_work is None:
        parser.error("the synthetic stage needs --demo-work")
    dirs = work_folders(args.work)
    work = dirs["work"]
    missing = [spec for spec in real_ct.our_specs(list(FOLDS)) if not (
        real_ct.model_folder(dirs, *real_ct.models(FOLDS)[spec]) / "checkpoint_final.pth").is_file()]
    if missing and set(args.stages) - {"synthetic"}:
        log(f"not trained in {work}: {', '.join(missing)} (python benchmarks/real_ct.py --work {args.work} "
            "--stages dataset plan train --our-folds 0 1)")
        return 2
    path = work / "review_scores.json"
    record = run_stages(path, {"predict": lambda r: stage_predict(dirs, r), "scores": lambda r: stage_scores(dirs, r),
                               "fusion": lambda r: stage_fusion(dirs, r),
                               "synthetic": lambda r: stage_synthetic(dirs, r, args.demo_work)}, args.stages, log)
    print(markdown(record))
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
