#!/usr/bin/env bash
# The main job on an embedded default, CPU only: environment, install, register, synthetic dataset, then
# nnU-Net's own commands to plan, preprocess, train the three sampling trainers briefly, predict, and our
# commands to fuse with uncertainty, evaluate, and do prediction + fusion in one command (gtv-predict).
# Takes about 15-20 minutes on 2 CPU cores.
# GTV_WORK chooses the working folder (default: gtv_work in the repository root).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
START=$(date +%s)
WORK="${GTV_WORK:-$REPO_ROOT/gtv_work}"
DATASET_ID=990
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-2}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
step() { echo; echo "[demo $(( $(date +%s) - START ))s] $*"; }

step "1/7 synthetic CT dataset (8 training + 2 test cases, mixed orientations)"
gtv-synthetic -o "$nnUNet_raw" -d $DATASET_ID --num-train 8 --num-test 2 --size 128 --slices 44 \
  --orientations mixed --overwrite
RAW="$nnUNet_raw/Dataset${DATASET_ID}_SyntheticGTV"

step "2/7 nnUNetv2_plan_and_preprocess with nnUNetPlannerGTV25D"
nnUNetv2_plan_and_preprocess -d $DATASET_ID -pl nnUNetPlannerGTV25D -c 3d_fullres -np 2 --verify_dataset_integrity

MODELS=()
for SCALE in Local Middle Global; do
  step "3/7 nnUNetv2_train: nnUNetTrainerGTV25D${SCALE}_smoke, fold 0 (a short CPU run)"
  nnUNetv2_train $DATASET_ID 3d_fullres 0 -tr "nnUNetTrainerGTV25D${SCALE}_smoke" -device cpu
  step "4/7 nnUNetv2_predict --save_probabilities with the $SCALE model"
  nnUNetv2_predict -i "$RAW/imagesTs" -o "$WORK/predictions/$SCALE" -d $DATASET_ID -c 3d_fullres \
    -tr "nnUNetTrainerGTV25D${SCALE}_smoke" -f 0 -device cpu --save_probabilities -npp 1 -nps 1
  MODELS+=("$WORK/predictions/$SCALE")
done

step "5/7 gtv-uncertainty: fuse ${#MODELS[@]} models, largest component, entropy map, VVC"
gtv-uncertainty -i "${MODELS[@]}" -o "$WORK/fused" -np 2

step "6/7 gtv-evaluate against the test labels"
gtv-evaluate -p "$WORK/fused" -r "$RAW/labelsTs" --images "$RAW/imagesTs"

step "7/7 gtv-predict: the same three models from the CTs in one command (one preprocessing, fused in memory)"
gtv-predict -i "$RAW/imagesTs" -o "$WORK/fused_gtv_predict" -d $DATASET_ID -m Local:0 Middle:0 Global:0 \
  -tr_suffix _smoke -device cpu --review

step "done. Results:"
echo "  trained models:        $nnUNet_results/Dataset${DATASET_ID}_SyntheticGTV/"
echo "  per-model predictions: $WORK/predictions/{Local,Middle,Global}/"
echo "  fused GTV + entropy:   $WORK/fused/ (summary.csv)"
echo "  evaluation report:     $WORK/fused/evaluation/report.md"
echo "  gtv-predict outputs:   $WORK/fused_gtv_predict/"
echo "  review page:           $WORK/fused_gtv_predict/review/review.html"
