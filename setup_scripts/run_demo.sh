#!/usr/bin/env bash
# The main job on an embedded default, CPU only: environment, install, register, synthetic dataset, then
# nnU-Net's own commands to plan, preprocess and train the three sampling trainers (the `_cpu` recipe, a few
# minutes each), our gtv-predict to segment the held-out test CTs with the three models fused, gtv-evaluate
# against their labels, and the two-step path (nnUNetv2_predict per model, then gtv-uncertainty).
# Takes about 25 minutes on 2 quiet CPU cores, environment set-up included.
# GTV_WORK chooses the working folder (default: gtv_work in the repository root). GTV_NODES=1 runs the same steps on
# two labels, the primary (GTVp) and 1-4 lymph nodes (GTVnd) per case, as SegRap2023 labels them (dataset 991).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
START=$(date +%s)
WORK="${GTV_WORK:-$REPO_ROOT/gtv_work}"
if [ "${GTV_NODES:-0}" = "1" ]; then
  DATASET_ID=991 DATASET_NAME=SyntheticNPC NODES=(--nodes) TARGETS="GTVp + GTVnd"
else
  DATASET_ID=990 DATASET_NAME=SyntheticGTV NODES=() TARGETS="GTV"
fi
export nnUNet_raw="$WORK/nnUNet_raw" nnUNet_preprocessed="$WORK/nnUNet_preprocessed" nnUNet_results="$WORK/nnUNet_results"
# nnU-Net's process pools sized to a 2-core machine (its export pools default to 8 workers of ~0.9 GiB each)
export nnUNet_n_proc_DA="${nnUNet_n_proc_DA:-1}" nnUNet_def_n_proc="${nnUNet_def_n_proc:-2}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
mkdir -p "$nnUNet_raw" "$nnUNet_preprocessed" "$nnUNet_results"
step() { echo; echo "[demo $(( $(date +%s) - START ))s] $*"; }

step "1/6 synthetic CT dataset (10 training + 3 held-out test cases, mixed orientations, 5-60 ml tumours; $TARGETS)"
gtv-synthetic -o "$nnUNet_raw" -d $DATASET_ID -n $DATASET_NAME --num-train 10 --num-test 3 --size 128 --slices 44 \
  --in-plane-mm 1.6 1.9 --orientations mixed --overwrite "${NODES[@]}"
RAW="$nnUNet_raw/Dataset${DATASET_ID}_${DATASET_NAME}"

step "2/6 nnUNetv2_plan_and_preprocess with nnUNetPlannerGTV25D"
nnUNetv2_plan_and_preprocess -d $DATASET_ID -pl nnUNetPlannerGTV25D -c 3d_fullres -np 2 --verify_dataset_integrity

for SCALE in Local Middle Global; do
  step "3/6 nnUNetv2_train: nnUNetTrainerGTV25D${SCALE}_cpu, fold 0 (the CPU recipe: batch 4, 300 iterations; Global 600)"
  nnUNetv2_train $DATASET_ID 3d_fullres 0 -tr "nnUNetTrainerGTV25D${SCALE}_cpu" -device cpu
done

step "4/6 gtv-predict: the three models on the held-out CTs, fused (component rule per label, entropy map, VVC, review page)"
gtv-predict -i "$RAW/imagesTs" -o "$WORK/fused" -d $DATASET_ID -m Local:0 Middle:0 Global:0 -tr_suffix _cpu \
  -device cpu --save-model-predictions --review

step "5/6 gtv-evaluate against the held-out labels (Dice, NSD, ASSD, HD95, RVE per label, model and fused; overlays)"
gtv-evaluate -p "$WORK/fused" -r "$RAW/labelsTs" --images "$RAW/imagesTs"

step "6/6 the same with nnU-Net's own prediction: nnUNetv2_predict per model, then gtv-uncertainty"
MODELS=()
for SCALE in Local Middle Global; do
  nnUNetv2_predict -i "$RAW/imagesTs" -o "$WORK/predictions/$SCALE" -d $DATASET_ID -c 3d_fullres \
    -tr "nnUNetTrainerGTV25D${SCALE}_cpu" -f 0 -device cpu --save_probabilities -npp 1 -nps 1 --disable_progress_bar
  MODELS+=("$WORK/predictions/$SCALE")
done
gtv-uncertainty -i "${MODELS[@]}" -o "$WORK/fused_two_step" -np 1

step "done in $(( $(date +%s) - START ))s after set-up. Results:"
echo "  trained models:         $nnUNet_results/Dataset${DATASET_ID}_${DATASET_NAME}/"
echo "  fused $TARGETS + entropy: $WORK/fused/ (summary.csv; each model's own segmentation in model_predictions/)"
echo "  review page:            $WORK/fused/review/review.html (open in a browser: the cases to check first)"
echo "  evaluation report:      $WORK/fused/evaluation/report.md (Dice table, overlays)"
echo "  two-step path:          $WORK/predictions/{Local,Middle,Global}/ -> $WORK/fused_two_step/"
