"""Organs learnt beside the PTV70 on real CT: six labels, three models of fold 0, at the CPU budget.

Runs in ``benchmarks/real_ct.py``'s working folder (its dataset 920, the PTV70 alone, and its fold-0 models are the
comparison):

1. ``dataset``: ``gtv-dataset --target PTV70 Brainstem SpinalCord LeftParotid RightParotid Mandible --overlap
   earlier --missing-mask skip --split <920's split.json>`` -> Dataset921_HeadNeckOrgansPTV70. The 48 patients with
   all six masks; the test patients of real_ct.py that have them stay held out (10 of its 16). **Overlap rule**: the
   PTV70 wins where it overlaps an organ (``--overlap earlier``, the PTV70 first), so label 1 is exactly the binary
   dataset's PTV70 and the two models are scored against the same reference; an organ loses the part inside the PTV70
   (a parotid a median 12 %, the mandible 8 %; never the brainstem or cord, facts.md section 8).
2. ``plan``: our planner on real_ct.py's grid (3 x 4 x 4 mm), and ``splits_final.json`` = real_ct.py's five folds
   (nnU-Net's own, seed 12345, over dataset 920's 60 training CTs) restricted to these patients: fold 0's validation
   CTs are validation CTs of the binary fold-0 models too.
3. ``train``: ``nnUNetTrainerGTV25D{Local,Middle,Global}_<recipe>`` fold 0 (``nnUNetv2_train``); ``--recipe``
   cpuRealCT (500 iterations, float32; the default) or cpuRealCTLong (1400 iterations under bfloat16: the whole
   45-minute budget). ``--folds 0 1``: the models of both folds (six). Each recipe and set of folds has its own
   folder (``organs``, ``organs_<recipe>``, ``organs_<recipe>_folds01``) and results file.
4. ``validation``: each fold's three fused (real_ct.py's rule: Local weight 0.5; region-aware) on that fold's
   validation CTs with every component kept; ``gtv-postprocessing`` chooses each label's component rule on them
   (the folds pooled, as nnU-Net's cross-validation).
5. ``test``: all the models fused with that choice on the held-out CTs, ``gtv-evaluate`` per label (Dice, NSD, HD95,
   RVE; overlays).
6. ``ptv70`` (fold 0 only): the PTV70 trained with the organs against the PTV70 alone (real_ct.py's fold-0 three, same
   fusion), on fold 0's shared validation CTs with every component kept (the study), then on the test CTs with each
   one's own rule (largest component for the binary models, the chosen rules here).

Results go to ``DIR/real_ct_organs<suffix>.json`` (the folder's suffix), markdown on stdout.

    python benchmarks/real_ct_organs.py --work DIR [--recipe cpuRealCTLong] [--folds 0 1] [--stages ...] [--docs DIR]
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import real_ct
from common import load_average, logger, nnunet_command, run_stages, work_folders

DATASET_ID, DATASET = 921, "Dataset921_HeadNeckOrgansPTV70"
TARGETS = ("PTV70", "Brainstem", "SpinalCord", "LeftParotid", "RightParotid", "Mandible")
FOLD = 0
FUSION_RULE = "Local weight 0.5, largest component"  # real_ct.py's, chosen there on fold 0's validation CTs
STAGES = ("dataset", "plan", "train", "validation", "test", "ptv70")
RECIPES = ("cpuRealCT", "cpuRealCTLong")  # trainer suffixes; the first is real_ct.py's recipe
log = logger("real_ct_organs")


def stage_dataset(dirs: dict, source: Path) -> None:
    if (dirs["nnUNet_raw"] / DATASET / "dataset.json").is_file():
        return
    split = dirs["nnUNet_raw"] / real_ct.DATASET / "split.json"
    if not split.is_file():
        raise SystemExit(f"{split} not found: run benchmarks/real_ct.py --work {dirs['work']} --stages dataset first")
    real_ct.run([nnunet_command("gtv-dataset"), "-i", str(source), "-o", str(dirs["nnUNet_raw"]), "-d",
                 str(DATASET_ID), "-n", DATASET.split("_", 1)[1], "--target", *TARGETS, "--overlap", "earlier",
                 "--missing-mask", "skip", "--split", str(split)], dirs["logs"] / "gtv-dataset_921.log")


def stage_plan(dirs: dict) -> None:
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    folder = dirs["nnUNet_preprocessed"] / DATASET
    if not (folder / f"{real_ct.OUR_PLANS}_3d_fullres").is_dir():
        real_ct.run([nnunet_command("nnUNetv2_plan_and_preprocess"), "-d", str(DATASET_ID), "-pl",
                     "nnUNetPlannerGTV25D", "-c", "3d_fullres", "-np", "2", "-overwrite_target_spacing",
                     *real_ct.OUR_SPACING, "-overwrite_plans_name", real_ct.OUR_PLANS, "--verify_dataset_integrity"],
                    dirs["logs"] / "plan_921.log")
    binary = json.loads((dirs["nnUNet_raw"] / real_ct.DATASET / "split.json").read_text())["train"]
    ours = set(json.loads((dirs["nnUNet_raw"] / DATASET / "split.json").read_text())["train"])
    splits = [{part: sorted(c for c in fold[part] if c in ours) for part in ("train", "val")}
              for fold in generate_crossval_split(sorted(binary), seed=12345, n_splits=5)]
    (folder / "splits_final.json").write_text(json.dumps(splits, indent=1) + "\n")


def specs(dirs: dict, folds: list[int] | None = None) -> list[str]:
    """The models (SCALE:FOLD) of ``folds``, by default every fold of this run."""
    return real_ct.our_specs(dirs["folds"] if folds is None else folds)


def stage_train(dirs: dict, record: dict) -> None:
    training = record.setdefault("training", {})
    for spec in specs(dirs):
        scale, fold = spec.split(":")
        trainer = f"nnUNetTrainerGTV25D{scale}_{dirs['recipe']}"
        folder = dirs["nnUNet_results"] / DATASET / f"{trainer}__{real_ct.OUR_PLANS}__3d_fullres" / f"fold_{fold}"
        if not (folder / "checkpoint_final.pth").is_file():
            load_before = load_average()
            seconds = real_ct.run([nnunet_command("nnUNetv2_train"), str(DATASET_ID), "3d_fullres", fold, "-tr",
                                   trainer, "-p", real_ct.OUR_PLANS, "-device", "cpu"],
                                  dirs["logs"] / f"train_921_{scale}_{fold}{suffix(dirs)}.log")
            training[spec] = {"command_seconds": seconds, "load": [load_before, load_average()]}
        training.setdefault(spec, {}).update(real_ct.training_log(folder))
        log(f"{spec}: {training[spec]['epochs']} epochs, training loop {training[spec]['loop_minutes']:.1f} min")


def suffix(dirs: dict) -> str:
    """The names of a run's folder and results file: "" for the default recipe on fold 0, else "_<recipe>" and/or
    "_folds<folds>"."""
    return (("" if dirs["recipe"] == RECIPES[0] else f"_{dirs['recipe']}")
            + ("" if dirs["folds"] == [FOLD] else "_folds" + "".join(map(str, dirs["folds"]))))


def work_folder(dirs: dict, name: str) -> Path:
    folder = dirs["work"] / f"organs{suffix(dirs)}" / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    return folder


def pool_folds(runs: list[Path], output: Path) -> None:
    """The fused out-of-fold runs as one folder (cases linked, summary.csv rows joined), as gtv-postprocessing
    reads cross-validation predictions."""
    if (output / "summary.json").is_file():
        return
    shutil.rmtree(output, ignore_errors=True)
    output.mkdir(parents=True)
    rows = []
    for run in runs:
        for path in run.glob("*.nii.gz"):
            (output / path.name).symlink_to(path.resolve())
        lines = (run / "summary.csv").read_text().splitlines()
        rows += lines[1:] if rows else lines
    (output / "summary.csv").write_text("\n".join(rows) + "\n")
    shutil.copyfile(runs[0] / "summary.json", output / "summary.json")


def stage_validation(dirs: dict, record: dict) -> None:
    runs = []
    for fold in dirs["folds"]:
        runs.append(work_folder(dirs, f"fold{fold}_validation_all_components"))
        real_ct.predict_ensemble(dirs, real_ct.validation_images(dirs, fold, DATASET), runs[-1], specs(dirs, [fold]),
                                 [*real_ct.fusion_options(FUSION_RULE, specs(dirs, [fold])), "--keep-all-components"],
                                 DATASET, dirs["recipe"])
    output = runs[0]
    if len(runs) > 1:
        output = work_folder(dirs, "validation_all_components")
        pool_folds(runs, output)
    rules = work_folder(dirs, "postprocessing.json")
    real_ct.run([nnunet_command("gtv-postprocessing"), "-p", str(output), "-r",
                 str(dirs["nnUNet_raw"] / DATASET / "labelsTr"), "-o", str(rules)],
                work_folder(dirs, "postprocessing.log"))
    record["postprocessing"] = json.loads(rules.read_text())


def evaluate(dirs: dict, predictions: Path, labels: Path, images: Path | None = None) -> dict:
    """gtv-evaluate's evaluation.json of ``predictions`` (written beside them)."""
    output = predictions.parent / f"{predictions.name}_evaluation"
    if not (output / "evaluation.json").is_file():
        real_ct.run([nnunet_command("gtv-evaluate"), "-p", str(predictions), "-r", str(labels), "-o", str(output),
                     *(["--images", str(images)] if images else [])], dirs["logs"] / f"{output.name}.log")
    return json.loads((output / "evaluation.json").read_text())


def stage_test(dirs: dict, record: dict) -> None:
    raw = dirs["nnUNet_raw"] / DATASET
    output = work_folder(dirs, "test")
    load_before, start = load_average(), time.perf_counter()
    if real_ct.predict_ensemble(dirs, raw / "imagesTs", output, specs(dirs),
                                [*real_ct.fusion_options(FUSION_RULE, specs(dirs)), "--postprocessing",
                                 str(work_folder(dirs, "postprocessing.json"))], DATASET, dirs["recipe"]):
        record["test_predict"] = {"seconds": time.perf_counter() - start, "load": [load_before, load_average()]}
    doc = evaluate(dirs, output, raw / "labelsTs", raw / "imagesTs")
    record["test"] = {"fused": doc["summary_per_label"], "cases": doc["cases"],
                      "per_case": [row for row in doc["metrics"] if row["source"] == "fused"]}


def ptv70_dice(folder: Path, labels: Path, cases: list[str]) -> dict[str, float]:
    return {case: s["dice"] for case, s in real_ct.dice_against_labels(folder, labels, cases).items()}


def compare(with_organs: dict[str, float], alone: dict[str, float]) -> dict:
    from scipy import stats

    cases = sorted(with_organs)
    differences = [with_organs[c] - alone[c] for c in cases]
    return {"cases": cases, "with_organs": with_organs, "alone": alone,
            "mean": {"with organs": statistics.fmean(with_organs.values()), "alone": statistics.fmean(alone.values())},
            "better": sum(d > 0 for d in differences), "worse": sum(d < 0 for d in differences),
            "wilcoxon_p": float(stats.wilcoxon(differences).pvalue) if any(differences) else None}


def stage_ptv70(dirs: dict, record: dict) -> None:
    """The binary fold-0 models' saved outputs (benchmarks/review_scores.py's predict stage) re-fused as needed."""
    if dirs["folds"] != [FOLD]:
        raise SystemExit(f"the ptv70 stage compares the three models of fold {FOLD}: run it without --folds")
    binary_specs = real_ct.our_specs([FOLD])
    validation_run = dirs["work"] / "review_scores" / f"fold_{FOLD}_validation_abstain"
    test_run = dirs["work"] / "review_scores" / "test_abstain"
    for run_folder in (validation_run, test_run):
        if not (run_folder / "summary.json").is_file():
            raise SystemExit(f"{run_folder} not found: run benchmarks/review_scores.py --work {dirs['work']} "
                             "--stages predict first")
    options = real_ct.fusion_options(FUSION_RULE, binary_specs)
    alone_validation = work_folder(dirs, "ptv70_alone_fold0_validation_all_components")
    if not (alone_validation / "summary.json").is_file():
        real_ct.fuse_saved_outputs(real_ct.model_prediction_folders(validation_run, binary_specs), alone_validation,
                                   [*options, "--keep-all-components"])
    alone_test = work_folder(dirs, "ptv70_alone_fold0_test")
    if not (alone_test / "summary.json").is_file():  # the six-model run's fold-0 outputs, fused as the three
        fold0 = [folder for folder in real_ct.model_prediction_folders(test_run, real_ct.our_specs([0, 1]))
                 if folder.name.endswith(f"__fold_{FOLD}")]
        real_ct.fuse_saved_outputs(fold0, alone_test, options)
    raw = dirs["nnUNet_raw"] / DATASET
    validation_cases = real_ct.validation_cases(dirs, FOLD, DATASET)
    test_cases = sorted(p.name[:-len(".nii.gz")] for p in (raw / "labelsTs").glob("*.nii.gz"))
    record["ptv70"] = {
        "validation (every component kept)": compare(
            ptv70_dice(work_folder(dirs, "fold0_validation_all_components"), raw / "labelsTr",
                       validation_cases),
            ptv70_dice(alone_validation, raw / "labelsTr", validation_cases)),
        "test (each one's own rule)": compare(ptv70_dice(work_folder(dirs, "test"), raw / "labelsTs",
                                                         test_cases),
                                              ptv70_dice(alone_test, raw / "labelsTs", test_cases))}


def markdown(record: dict) -> str:
    lines = []
    if "test" in record:
        lines += ["| label | Dice | NSD | HD95 (mm) | RVE (%) |", "|---|---|---|---|---|"]
        for label, summary in record["test"]["fused"].items():
            fused = summary["fused"]
            lines.append(f"| {label} | " + " | ".join(f"{fused[m]['mean']:.3f} ± {fused[m]['std']:.3f}"
                                                      for m in ("dice", "nsd", "hd95_mm", "rve_percent")) + " |")
        organs = [record["test"]["fused"][name]["fused"]["dice"]["mean"] for name in TARGETS[1:]]
        lines += ["", f"Organs' mean Dice: {statistics.fmean(organs):.3f} ({len(record['test']['cases'])} test CTs)",
                  ""]
    for setting, c in record.get("ptv70", {}).items():
        p = "–" if c["wilcoxon_p"] is None else f"{c['wilcoxon_p']:.3g}"
        lines.append(f"PTV70, {setting}, {len(c['cases'])} CTs: with organs {c['mean']['with organs']:.3f}, alone "
                     f"{c['mean']['alone']:.3f}; better in {c['better']}, worse in {c['worse']} (Wilcoxon p {p})")
    return "\n".join(lines)


def copy_overlays(dirs: dict, record: dict, docs: Path) -> None:
    """The overlays of the best, median and worst test CT (organs' mean Dice) into ``docs``."""
    per_case: dict[str, list[float]] = {}
    for row in record["test"]["per_case"]:
        if row["label_name"] != "PTV70":
            per_case.setdefault(row["case"], []).append(row["dice"])
    ranked = sorted(per_case, key=lambda case: statistics.fmean(per_case[case]))
    docs.mkdir(parents=True, exist_ok=True)
    for kind, case in (("worst", ranked[0]), ("median", ranked[len(ranked) // 2]), ("best", ranked[-1])):
        source = work_folder(dirs, "test_evaluation") / f"overlay_{case}.png"
        target = docs / f"organs{suffix(dirs)}_test_{kind}_{case}.png"
        shutil.copyfile(source, target)
        log(f"{kind} test CT by the organs' mean Dice: {case} -> {target}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--work", type=Path, required=True, help="benchmarks/real_ct.py's working folder")
    parser.add_argument("--source", type=Path, help="patient folders (default: real_ct.py's)")
    parser.add_argument("--recipe", choices=RECIPES, default=RECIPES[0],
                        help="the trainers' suffix (default: %(default)s)")
    parser.add_argument("--folds", nargs="+", type=int, default=[FOLD], help="folds whose models are trained and fused "
                        "(default: %(default)s)")
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--docs", type=Path, help="copy the best, median and worst test overlay into this folder")
    args = parser.parse_args(argv)
    dirs = {**work_folders(args.work), "recipe": args.recipe, "folds": sorted(set(args.folds))}
    work = dirs["work"]
    source = args.source or real_ct.DEFAULT_SOURCE
    if not source.is_dir():
        log(f"{source} not found: nothing to do")
        return 2
    path = work / f"real_ct_organs{suffix(dirs)}.json"
    record = run_stages(path, {"dataset": lambda r: stage_dataset(dirs, source), "plan": lambda r: stage_plan(dirs),
                               "train": lambda r: stage_train(dirs, r),
                               "validation": lambda r: stage_validation(dirs, r),
                               "test": lambda r: stage_test(dirs, r), "ptv70": lambda r: stage_ptv70(dirs, r)},
                        args.stages, log)
    if args.docs and "test" in record:
        copy_overlays(dirs, record, args.docs)
    print(markdown(record))
    log(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
