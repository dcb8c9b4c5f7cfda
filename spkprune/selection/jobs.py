"""`spkprune select-tokens` as a library call: settings in, the fine-tuned checkpoint and its analysis out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from spkprune.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from spkprune.errors import SpkpruneError
from spkprune.models import family_of_meta
from spkprune.models.token_flow import dense_block_tokens
from spkprune.paths import check_output_folder
from spkprune.selection.analysis import analysis_model, analyze_tokens, rate_table, sample_images, write_analysis
from spkprune.selection.finetune import SelectionResult, check_budget, select_tokens
from spkprune.selection.settings import SelectTokensSettings
from spkprune.sensitivity.allocation import location_keep, stored_scan
from spkprune.store import Artifact, Store, is_store_ref, parse_ref

Log = Callable[[str], None]


@dataclass
class TokenAnalysisOutcome:
    table: pd.DataFrame  # firing rate of kept vs dropped tokens
    pictures: dict[str, Path]
    images: int
    dataset: str


@dataclass
class SelectTokensOutcome:
    artifact: Artifact | None  # NAME@main (None for an analysis alone)
    source: Checkpoint
    result: SelectionResult | None
    analysis: TokenAnalysisOutcome | None = None
    scorer: str | None = None
    action: str = "drop"
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_block(self) -> list[int] | None:
        return list(self.result.tokens_per_block) if self.result is not None else None

    def summary(self) -> dict:
        """Teacher and student accuracy and where the result went (the JSON beside the tokens table)."""
        if self.result is None:
            return {}
        teacher, student = self.result.teacher_metrics["top1"], self.result.metrics["top1"]
        return {
            "ref": self.artifact.ref, "parent": self.source.ref, "scorer": self.scorer, "action": self.action,
            "teacher_top1": teacher,
            "student_top1": student, "change_points": round(100 * (student - teacher), 4),
        }

    def tokens_frame(self) -> pd.DataFrame:
        located = set(self.result.checkpoint.meta["selector"]["locations"])
        dense = dense_block_tokens(self.result.model)  # the fraction of the block's own tokens (QKFormer's stages)
        return pd.DataFrame([
            {"block": block, "selector": block in located, "tokens": count, "fraction": count / dense[block]}
            for block, count in enumerate(self.result.tokens_per_block)
        ])


def run_select_tokens(
    store: Store | None, settings: SelectTokensSettings, *, progress: bool = True, log: Log = lambda message: None
) -> SelectTokensOutcome:
    """Fine-tune a token selector into `settings.name` (checked before any work) and/or analyse firing rates."""
    if settings.name is None and not settings.analyze:
        raise SpkpruneError("give --name NAME to store the result (or --analyze to only draw the firing rates)")
    if settings.name is not None:
        _check_name_free(store, settings)
    if settings.analyze:
        check_output_folder(settings.out, "--out")
    if settings.name is not None:
        check_budget(settings.selection(), settings.epochs)
    source = load_checkpoint(settings.ref, store)
    check_selectable(source, settings.locations)
    if settings.keep_allocation == "sensitivity":
        keep = _allocated_keep(store, settings)
        settings = settings.replace(keep=keep)
        log(f"keep per location from the sensitivity scan: {', '.join(f'{ratio:.4g}' for ratio in keep)}")
    outcome = SelectTokensOutcome(None, source, None)
    analysed = source
    if settings.name is not None:
        outcome = _finetune(store, source, settings, progress, log)
        analysed = outcome.result.checkpoint
    if settings.analyze:
        outcome.analysis = _analyze(analysed, settings, log)
    return outcome


def check_selectable(source: Checkpoint, locations=None) -> None:
    """One line, before any work, when the source's family has no token axis a selector can gather."""
    family = family_of_meta(source.meta)
    if family is None or family.token_selection:
        return  # a model of no known family: building it says what is wrong
    asked = f"--locations {','.join(map(str, locations))}: " if locations else ""
    raise SpkpruneError(
        f"{asked}select-tokens does not work on the {family.name} family yet: {source.meta.get('arch') or 'its model'}"
        " has no token axis a selector can gather (no selector locations; see docs/model-families.md)"
    )


def _allocated_keep(store: Store | None, settings: SelectTokensSettings) -> list[float]:
    """Cumulative keep ratios per location from the stored location scan of REF (`--keep-allocation sensitivity`)."""
    art = store.resolve(settings.ref) if store is not None and is_store_ref(settings.ref) else None
    scan = stored_scan(store, art, "locations", "--keep-allocation sensitivity")
    locations = settings.locations or sorted({int(row["unit"].split()[1]) for row in scan["rows"]})
    return location_keep(scan, settings.keep, locations)


def _check_name_free(store: Store | None, settings: SelectTokensSettings) -> None:
    parse_ref(f"{settings.name}@main")
    if store is not None and store.exists(settings.name, "main") and not settings.overwrite:
        raise SpkpruneError(
            f"{settings.name}@main already exists in the store; choose another --name or pass --overwrite"
        )


def _finetune(store: Store, source: Checkpoint, settings: SelectTokensSettings, progress: bool,
              log: Log) -> SelectTokensOutcome:
    selection = settings.selection()
    teacher = load_checkpoint(settings.teacher, store) if settings.teacher else None
    result = select_tokens(source, selection, epochs=settings.epochs, teacher=teacher,
                           train_overrides=settings.train_overrides(), progress=progress)
    art = save_checkpoint(store, settings.name, "main", result.checkpoint, parent=source.ref,
                          replace=settings.overwrite)
    log(f"saved {art.ref} (parent {source.ref})")
    return SelectTokensOutcome(art, source, result, scorer=selection.scorer, action=selection.action)


def _analyze(ckpt: Checkpoint, settings: SelectTokensSettings, log: Log) -> TokenAnalysisOutcome:
    selector = {"keep": settings.keep, "scorer": settings.scorer or "firing-rate", "action": settings.action}
    if settings.locations:
        selector["locations"] = list(settings.locations)
    model = analysis_model(ckpt, selector)
    train = ckpt.meta.get("train") or {}
    dataset = settings.dataset or train.get("dataset") or model.config.dataset
    if not dataset:
        raise SpkpruneError(f"{ckpt.ref or 'the checkpoint'} records no data set; pass --dataset")
    images = sample_images(dataset, settings.data_dir or train.get("data_dir"), settings.samples,
                           model.config.timesteps, model.config.img_size)
    analysis = analyze_tokens(model, images)
    paths = write_analysis(analysis, settings.out)
    for path in paths.values():
        log(f"wrote {path}")
    return TokenAnalysisOutcome(rate_table(analysis), dict(paths), len(images), dataset)
