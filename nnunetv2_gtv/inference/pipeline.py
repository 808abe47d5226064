"""gtv-predict's run over cases: read, preprocess once, every model, then fuse and export (optionally in parallel).

Finished cases leave gtv-uncertainty's per-case records, so ``--continue`` and sharded runs (``num_parts``) that
share an output folder end with one summary row per finished case.
"""
from __future__ import annotations

import multiprocessing
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from nnunetv2_gtv.errors import CaseError
from nnunetv2_gtv.ensemble.folders import DatasetInfo, label_names, label_values
from nnunetv2_gtv.ensemble.fusion import FusionSettings, output_files
from nnunetv2_gtv.ensemble.summary import load_record
from nnunetv2_gtv.inference.export import ExportJob, export_case, prepare_model_predictions_folder
from nnunetv2_gtv.inference.inputs import InputCase, InputError, axial_permutation, intensity_warning, permute_case, \
    read_case
from nnunetv2_gtv.inference.predictor import EnsemblePredictor
from nnunetv2_gtv.runs import CaseTiming, finished_row, part_of

Log = Callable[[str], None]


class PredictionError(CaseError):
    """A model's prediction of a case failed while its export was waiting for it."""


@dataclass(frozen=True)
class RunOptions:
    """num_processes: export processes beside prediction (0, or a single case: export in this process)."""

    num_processes: int = 2
    resume: bool = False
    num_parts: int = 1
    part_id: int = 0
    model_folders: tuple[Path, ...] | None = None  # also write each model's own prediction there
    progress: bool = True
    overlap_export: bool = False  # export each model while the next ones predict (when the models run on a GPU)
    check_only: bool = False  # predict nothing: every case not finished before is a failure


@dataclass
class RunReport:
    rows: dict[str, dict] = field(default_factory=dict)  # every finished case in OUT with these settings
    done: list[str] = field(default_factory=list)  # cases this run finished
    skipped: list[str] = field(default_factory=list)  # already finished (--continue)
    failures: list[str] = field(default_factory=list)  # error messages
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, CaseTiming] = field(default_factory=dict)  # every finished case in OUT (from the records)


def dataset_info(ensemble: EnsemblePredictor, case: InputCase) -> DatasetInfo:
    """Outputs are written in the input's own format, by the plans' reader/writer, on the input's grid."""
    plans = ensemble.plans_manager.plans
    return DatasetInfo(file_ending=case.file_ending, num_labels=len(label_values(ensemble.dataset_json)),
                       reader_writer=plans["image_reader_writer"],
                       transpose_backward=tuple(plans["transpose_backward"]),
                       label_names=tuple(label_names(ensemble.dataset_json)))


def case_fingerprint(run_fingerprint: dict, case: InputCase) -> dict:
    series = {"dicom_series": case.series.series_uid} if case.series is not None else {}
    channels = {"channels": [str(f.resolve()) for f in case.extra_channels]} if case.extra_channels else {}
    return {**run_fingerprint, "image": str(case.path.resolve()), **channels, **series}


class LogitsStream:
    """Each model's logits, handed from the prediction loop to an export thread as soon as the model is done,
    so that resampling and fusion of one model overlap the next model's prediction. Holds at most
    ``capacity`` models' logits; ``abort`` ends the stream with an error for the export side."""

    _END = object()

    def __init__(self, capacity: int = 2):
        self._queue: queue.Queue = queue.Queue(capacity)
        self._ended = False
        self.closed_at: float | None = None

    def append(self, logits: np.ndarray) -> None:
        """Hand over one model's logits (named as ``list.append``: the pipeline fills either)."""
        self._queue.put(logits)

    def close(self) -> None:
        """The last model is in: the export's remaining time from now on is what the case waits for."""
        self.closed_at = time.perf_counter()
        self._queue.put(self._END)

    def abort(self, message: str) -> None:
        self._queue.put(PredictionError(message))

    def __iter__(self) -> Iterator[np.ndarray]:
        while not self._ended:
            item = self._queue.get()
            if item is self._END or isinstance(item, Exception):
                self._ended = True
                if isinstance(item, Exception):
                    raise item
                return
            yield item

    def drain(self) -> None:
        """Take what is left (the export stopped early), so that the prediction loop never blocks."""
        for _ in self:
            pass


class _Exporter:
    """Exports the cases: in this process (``num_processes`` 0), either after the case's last model or, with
    ``overlap``, in a thread fed model by model while the next models predict; or in a spawn pool of
    ``num_processes`` with at most ``num_processes + 1`` cases (each holding its models' logits) waiting.

    Overlap pays only when prediction leaves CPU cores free (a GPU): on a 2-core CPU the export thread slowed
    the models' OpenMP threads by more than it saved (six models on a 512 x 512 x 130 CT: 224 s with it, about
    197 s without)."""

    def __init__(self, num_processes: int, overlap: bool):
        self._pool = multiprocessing.get_context("spawn").Pool(num_processes) if num_processes > 0 else None
        self._pending: list = []
        self._limit = num_processes + 1
        self.streams = self._pool is None and overlap
        self.results: list[tuple[str, dict | None, str | None, float]] = []

    def start(self, job: ExportJob) -> Callable[[], float]:
        """Begin exporting ``job``, whose logits arrive in ``job.logits`` (a LogitsStream if ``streams``, else a
        list filled before the returned ``finish`` is called); ``finish`` returns the seconds it waited."""
        if self._pool is not None:
            def submit() -> float:
                while sum(not r.ready() for r in self._pending) >= self._limit:
                    time.sleep(0.05)
                self._pending.append(self._pool.apply_async(export_case, (job,)))
                return 0.0
            return submit
        if not self.streams:
            def export_now() -> float:
                self.results.append(export_case(job))
                return self.results[-1][3]
            return export_now
        stream = job.logits

        def export() -> None:
            try:
                self.results.append(export_case(job))
            finally:
                stream.drain()

        thread = threading.Thread(target=export, name=f"export {job.case}", daemon=True)
        thread.start()

        def wait() -> float:
            start = time.perf_counter()
            thread.join()
            return time.perf_counter() - start
        return wait

    def finish(self) -> list[tuple[str, dict | None, str | None, float]]:
        if self._pool is not None:
            with self._pool:
                self.results.extend(r.get() for r in self._pending)
        return self.results


def _cases_to_do(cases: Sequence[InputCase], output_folder: Path, fusion: FusionSettings, run_fingerprint: dict,
                 options: RunOptions, report: RunReport) -> list[tuple[InputCase, dict]]:
    """This part's cases with their fingerprints, less those finished before (--continue)."""
    todo = []
    for case in part_of(cases, options.num_parts, options.part_id):
        fingerprint = case_fingerprint(run_fingerprint, case)
        outputs = output_files(case.case, output_folder, case.file_ending, fusion)
        if options.resume and finished_row(output_folder, case.case, fingerprint, outputs) is not None:
            report.skipped.append(case.case)
        else:
            todo.append((case, fingerprint))
    return todo


@dataclass
class PreparedCase:
    """A CT preprocessed once for every model, and how to map predictions back to the input's grid."""

    data: object  # torch.Tensor (1, z, y, x), preprocessed
    boxes: dict  # sampling region boxes on the preprocessed grid
    properties: dict  # nnU-Net's, of the image the models see
    output_properties: dict  # of the input image: where the outputs go
    permutation: tuple[int, int, int] | None  # axis order the models see (None: the input's)


def prepare_case(ensemble: EnsemblePredictor, case: InputCase, report: RunReport, warn: Log) -> PreparedCase:
    """Read, check, reorient if needed, preprocess and find the sampling regions. Raises InputError."""
    image, properties = read_case(case, ensemble.plans_manager.image_reader_writer_class)
    problem = intensity_warning(image, case.path)
    if problem:
        report.warnings.append(problem)
        warn(f"gtv-predict: warning: {problem}")
    permutation = axial_permutation(properties["sitk_stuff"]["direction"])
    output_properties = properties
    if permutation is not None:
        warn(f"gtv-predict: {case.case}: slices are not axial; the image is permuted to axis order {permutation} "
             "for the models and the outputs are permuted back")
        transpose_forward = ensemble.plans_manager.transpose_forward
        output_properties = {**properties, "shape_before_cropping": tuple(image.shape[1:][a]
                                                                          for a in transpose_forward)}
        image, properties = permute_case(image, properties, permutation)
    data, properties = ensemble.preprocess(image, properties)
    del image
    boxes, region_warnings = ensemble.region_boxes(data, properties)
    for message in region_warnings:
        warn(f"gtv-predict: warning: {case.case}: sampling regions: {message}")
    return PreparedCase(data, boxes, properties, output_properties, permutation)


def predict_cases(ensemble: EnsemblePredictor, cases: Sequence[InputCase], output_folder: Path,
                  fusion: FusionSettings, run_fingerprint: dict, options: RunOptions = RunOptions(),
                  log: Log = print, warn: Log = lambda m: print(m, file=sys.stderr)) -> RunReport:
    """Segment this part's cases into ``output_folder``; failures are reported, not raised."""
    report = RunReport()
    plans = ensemble.plans_manager.plans
    for folder in options.model_folders or ():
        prepare_model_predictions_folder(folder, plans, ensemble.dataset_json)
    todo = _cases_to_do(cases, output_folder, fusion, run_fingerprint, options, report)
    if options.check_only:
        log(f"gtv-predict: {len(cases)} cases: {len(report.skipped)} finished in {output_folder} with these models "
            f"and settings, {len(todo)} not")
        report.failures.extend(f"{case.case}: not finished in {output_folder} with these models and settings "
                               f"({case.path})" for case, _ in todo)
        todo = []
    else:
        log(f"gtv-predict: {len(cases)} cases, this part {len(todo) + len(report.skipped)}: "
            f"{len(report.skipped)} already finished, {len(todo)} to predict with {len(ensemble.models)} models")

    exporter = _Exporter(options.num_processes if len(todo) > 1 else 0, options.overlap_export)
    labels = [m.label for m in ensemble.models]
    model_folders = list(options.model_folders or [None] * len(ensemble.models))
    progress = tqdm(total=len(todo) * len(ensemble.models), unit="model", disable=not options.progress or not todo)
    timings = {}
    for case, fingerprint in todo:
        timing = timings[case.case] = CaseTiming()
        start = time.perf_counter()
        try:
            prepared = prepare_case(ensemble, case, report, warn)
        except InputError as err:
            report.failures.append(str(err))
            progress.update(len(ensemble.models))
            continue
        timing.preprocessing = time.perf_counter() - start
        stream = LogitsStream() if exporter.streams else []
        regions = [ensemble.model_region(model, prepared.data, prepared.boxes) for model in ensemble.models]
        finish = exporter.start(ExportJob(case.case, stream, labels, model_folders, prepared.properties,
                                          prepared.output_properties, prepared.permutation, plans,
                                          ensemble.configuration_manager.configuration, ensemble.dataset_json,
                                          output_folder, dataset_info(ensemble, case), fusion, fingerprint,
                                          regions, tuple(prepared.data.shape[1:]), timing))
        try:
            for model in ensemble.models:
                progress.set_description(f"{case.case} {model.label}")
                start = time.perf_counter()
                logits = ensemble.predict_logits(model, prepared.data, prepared.boxes)
                timing.models.append(time.perf_counter() - start)
                stream.append(logits)
                del logits
                progress.update()
        except BaseException as err:
            if exporter.streams:
                stream.abort(f"prediction failed ({type(err).__name__}: {err})")
                finish()
            raise
        if exporter.streams:
            stream.close()
        del prepared
        timing.export = finish()
    progress.close()
    for case, row, error, seconds in exporter.finish():
        if error is None:
            report.rows[case] = row
            report.done.append(case)
            report.timings[case] = timings[case]
            if not exporter.streams:
                report.timings[case].export = seconds
            log(f"gtv-predict: {case}: {report.timings[case].describe()}")
        else:
            report.failures.append(error)
    for case in cases:  # cases finished earlier or by other parts, with the same models and settings
        record = load_record(output_folder, case.case, case_fingerprint(run_fingerprint, case))
        if record is None:
            continue
        report.rows.setdefault(case.case, record["row"])
        if case.case not in report.timings and "timing" in record:
            report.timings[case.case] = CaseTiming.from_json(record["timing"])
    return report
