"""From the raw recipe tree (YAML read, overrides applied: see loading.py) to a validated, resolved recipe.

Order of work: resolve `${...}` interpolation -> check every key and value against the stage's settings -> link
stage references -> hash each stage's identity. Any problem raises RecipeError naming the key path and what was
expected, before anything runs.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from spkprune.data import list_datasets
from spkprune.errors import SpkpruneError
from spkprune.models import get_config, list_models
from spkprune.recipes.recipe import Recipe, Stage, StageInput, stage_hash
from spkprune.recipes.messages import RecipeError, did_you_mean, kind_of, text_of
from spkprune.recipes.schema import (
    DATA_KEYS,
    SECTION_KEYS,
    STAGE_TYPES,
    TOP_LEVEL,
    RecipeData,
    RecipeTop,
    StageType,
)
from spkprune.settings import Settings
from spkprune.store.refs import DEFAULT_TAG

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_INTERP_RE = re.compile(r"\$\{([^}]*)\}")
_STAGE_FIELDS = ("ref", "name", "out", "hash")


# ------------------------------------------------------------------------------------------- the resolver
def resolve_recipe(raw: dict, where: str, default_name: str, path: Path | None, overrides: list[str]) -> "Recipe":
    """Interpolate, validate, link and hash a raw recipe tree (overrides already applied)."""
    return _Resolver(raw, where, default_name, path, overrides).recipe()


class _Resolver:
    def __init__(self, raw: dict, where: str, default_name: str, path: Path | None, overrides: list[str]):
        self.raw = raw
        self.where = where
        self.default_name = default_name
        self.path = path
        self.overrides = overrides
        self.resolving: list[str] = []
        self.cache: dict[str, Any] = {}
        self.stages: dict[str, Stage] = {}
        self.current_deps: list[str] | None = None

    def fail(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.where}: {key}: {message}")

    # ---------------------------------------------------------------- top level
    def recipe(self) -> Recipe:
        known = set(TOP_LEVEL) | set(SECTION_KEYS)
        for key in self.raw:
            if key not in known:
                raise self.fail(
                    str(key), f"unknown key{did_you_mean(str(key), known)}; expected one of {', '.join(sorted(known))}"
                )
        top = self.validated(RecipeTop, {key: self.value(key) for key in TOP_LEVEL}, "").model_dump()
        name = top["name"] or self.default_name
        if not _NAME_RE.match(name):
            raise self.fail("name", f"expected letters, digits and . _ + - (it prefixes artifact names), got {name!r}")
        top["name"] = name
        self.top = top
        if top["model"] is not None:
            self.check_model("model", top["model"])
        variables = self.section("vars")
        resolved_vars = {key: self.value(f"vars.{key}") for key in variables}
        data = self.section("data")
        for key in data:
            if key not in DATA_KEYS:
                raise self.fail(f"data.{key}", f"unknown key{did_you_mean(key, DATA_KEYS)}; expected one of dataset, data_dir")
        self.data = self.validated(RecipeData, {key: self.value(f"data.{key}") for key in DATA_KEYS}, "data").model_dump()
        self.data["dataset"] = self.data["dataset"] or self.model_dataset()
        if self.data["dataset"] is not None:
            self.check_dataset("data.dataset", self.data["dataset"])
        for stage_name, body in self.raw["stages"].items():
            self.stages[stage_name] = self.stage(stage_name, body)
        resolved = {
            **{key: value for key, value in top.items() if value is not None},
            "data": {key: value for key, value in self.data.items() if value is not None},
            "vars": resolved_vars,
            "stages": {
                stage.name: {"type": stage.type.name, **_plain_options(stage)} for stage in self.stages.values()
            },
        }
        return Recipe(
            path=self.path,
            name=name,
            model=top["model"],
            dataset=self.data["dataset"],
            data_dir=self.data["data_dir"],
            seed=top["seed"] if top["seed"] is not None else 0,
            store=top["store"],
            description=top["description"],
            vars=resolved_vars,
            stages=list(self.stages.values()),
            resolved=resolved,
            overrides=self.overrides,
        )

    def section(self, key: str) -> dict:
        value = self.raw.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {kind_of(value)}")
        return value

    def validated(self, model: type[Settings], values: dict, path: str) -> Settings:
        """`values` (None: not given) checked by `model`; errors name the key path, e.g. stages.imp.target."""
        try:
            return model.parse({key: value for key, value in values.items() if value is not None}, where=path)
        except SpkpruneError as err:
            raise RecipeError(f"{self.where}: {err}") from None

    def model_dataset(self) -> str | None:
        model = self.top["model"]
        if model is None:
            return None
        return self.check_model("model", model).dataset

    def check_model(self, key: str, name: str):
        if name not in list_models():
            raise self.fail(key, f"unknown model preset {name!r}{did_you_mean(name, list_models())}; see spkprune.list_models()")
        return get_config(name)

    def check_dataset(self, key: str, name: str) -> None:
        if name not in list_datasets():
            raise self.fail(key, f"unknown dataset {name!r}; expected one of {', '.join(list_datasets())}")

    # ---------------------------------------------------------------- interpolation
    def value(self, path: str) -> Any:
        """The interpolated value at a dotted path of the raw tree (None when absent)."""
        if path in self.cache:
            return self.cache[path]
        if path in self.resolving:
            cycle = " -> ".join([*self.resolving[self.resolving.index(path):], path])
            raise self.fail(path, f"interpolation cycle: {cycle}")
        node: Any = self.raw
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        self.resolving.append(path)
        try:
            result = self.interpolate(path, node)
        finally:
            self.resolving.pop()
        self.cache[path] = result
        return result

    def interpolate(self, key: str, node: Any) -> Any:
        if isinstance(node, dict):
            return {k: self.interpolate(f"{key}.{k}", v) for k, v in node.items()}
        if isinstance(node, list):
            return [self.interpolate(f"{key}[{i}]", v) for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _INTERP_RE.fullmatch(node.strip())
        if whole:  # `${vars.keep}` alone keeps the variable's type
            return self.lookup(key, whole.group(1).strip())
        return _INTERP_RE.sub(lambda m: text_of(self.lookup(key, m.group(1).strip())), node)

    def lookup(self, key: str, target: str) -> Any:
        parts = target.split(".")
        head = parts[0]
        if head == "stages":
            if not key.startswith("stages."):
                raise self.fail(key, f"${{{target}}}: only stage options can refer to stages")
            return self.stage_field(key, parts, target)
        if head == "vars" and len(parts) >= 2:
            if parts[1] not in self.section("vars"):
                known = list(self.section("vars"))
                raise self.fail(
                    key,
                    f"unknown variable ${{{target}}}{did_you_mean(parts[1], known)}; "
                    f"defined: {', '.join(known) or 'none (add a vars: section)'}",
                )
            return self.value(target)
        if head in TOP_LEVEL and len(parts) == 1:
            if head == "name":
                return self.raw.get("name") and self.value("name") or self.default_name
            return self.value(head)
        if head == "data" and len(parts) == 2 and parts[1] in DATA_KEYS:
            if hasattr(self, "data"):
                return self.data[parts[1]]
            return self.value(target)
        raise self.fail(
            key,
            f"cannot interpolate ${{{target}}}; use ${{vars.NAME}}, ${{model}}, ${{seed}}, ${{name}}, "
            "${data.dataset}, ${data.data_dir} or ${stages.STAGE.ref|name|out}",
        )

    def stage_field(self, key: str, parts: list[str], target: str) -> Any:
        if len(parts) != 3 or parts[2] not in _STAGE_FIELDS:
            raise self.fail(key, f"cannot interpolate ${{{target}}}; use ${{stages.STAGE.ref}}, .name or .out")
        stage = self.stages.get(parts[1])
        if stage is None:
            problem = "comes later" if parts[1] in self.raw["stages"] else "does not exist"
            raise self.fail(
                key, f"${{{target}}}: stage {parts[1]!r} {problem}; earlier stages: {', '.join(self.stages) or 'none'}"
            )
        if self.current_deps is not None and stage.name not in self.current_deps:
            self.current_deps.append(stage.name)
        field_name = parts[2]
        if field_name == "ref":
            return stage.output_ref
        if field_name == "name":
            return stage.artifact or stage.name
        if field_name == "hash":
            return stage.hash
        return stage.options.get("out")

    # ---------------------------------------------------------------- stages
    def stage(self, name: str, body: dict) -> Stage:
        base = f"stages.{name}"
        kind = body.get("type")
        if kind is None:
            raise self.fail(f"{base}.type", f"missing; expected one of {', '.join(STAGE_TYPES)}")
        if kind not in STAGE_TYPES:
            raise self.fail(
                f"{base}.type", f"unknown stage type {kind!r}{did_you_mean(str(kind), STAGE_TYPES)}; "
                f"expected one of {', '.join(STAGE_TYPES)}"
            )
        stype = STAGE_TYPES[kind]
        self.current_deps = []
        options: dict[str, Any] = {}
        for key in body:
            if key == "type":
                continue
            if key in stype.runner_sets:
                raise self.fail(f"{base}.{key}", "is not a recipe option (spkprune run decides resume and overwrite "
                                "itself; display options belong to the command line); remove it")
            if key not in stype.options:
                raise self.fail(
                    f"{base}.{key}",
                    f"unknown option for stage type {kind}{did_you_mean(key, stype.options)}; "
                    f"expected one of {', '.join(stype.options)}",
                )
            options[key] = self.value(f"{base}.{key}")
        stage = Stage(name=name, type=stype, options={})
        self.fill_defaults(stage, options)
        stage.settings = self.validated(stype.settings, _by_field(stype, options), base)
        stage.options = {key: _plain(getattr(stage.settings, stype.options[key].field)) for key in options
                         if options[key] is not None}
        self.link_inputs(stage)
        stage.deps = self.current_deps
        self.current_deps = None
        stage.hash = stage_hash(stage, self.stages)
        stage.output_ref = self.output_ref(stage)
        return stage

    def fill_defaults(self, stage: Stage, options: dict) -> None:
        base = f"stages.{stage.name}"
        top = {"model": self.top["model"], "seed": self.top["seed"], **{f"data.{k}": v for k, v in self.data.items()}}
        for option, source in stage.type.inherits.items():
            blocker = stage.type.inherit_unless.get(option)
            if blocker and options.get(blocker) is not None:
                continue
            if options.get(option) is None and top.get(source) is not None:
                options[option] = top[source]
        if "name" in stage.type.options:
            options["name"] = options.get("name") or f"{self.top['name']}-{stage.name}"
            if not _NAME_RE.match(options["name"]):
                raise self.fail(f"{base}.name", f"invalid artifact name {options['name']!r}; use letters, digits and . _ + -")
            stage.artifact = options["name"]
        if stage.type.output == "folder":
            options["out"] = options.get("out") or str(Path("exports") / f"{self.top['name']}-{stage.name}")
        if stage.type.name == "train":
            if options.get("arch") is None:
                raise self.fail(f"{base}.arch", "missing; set the recipe's `model` or the stage's `arch` (a preset name)")
            self.check_model(f"{base}.arch", options["arch"])
        for option in ("dataset",):
            if options.get(option) is not None:
                self.check_dataset(f"{base}.{option}", options[option])
        if stage.type.positional and options.get(stage.type.positional) is None:
            raise self.fail(
                f"{base}.{stage.type.positional}",
                f"missing; expected the stage this one reads (one of {', '.join(self.stages) or 'no earlier stage'})",
            )

    def link_inputs(self, stage: Stage) -> None:
        for option, opt in stage.type.options.items():
            value = stage.options.get(option)
            if not opt.is_ref or value is None:
                continue
            if isinstance(value, list):  # several references (bench): each linked like a single one
                stage.options[option] = [self.link(stage, f"{option}[{i}]", item) for i, item in enumerate(value)]
            else:
                stage.options[option] = self.link(stage, option, value)

    def link(self, stage: Stage, key: str, value: str) -> str:
        """Record what reference `value` of option `key` reads; the concrete reference to pass on."""
        target = self.parse_ref(f"stages.{stage.name}.{key}", value, stage)
        stage.inputs[key] = target
        if target.stage is None:
            return value
        if target.stage not in self.current_deps:
            self.current_deps.append(target.stage)
        return self.concrete_ref(target)

    def parse_ref(self, key: str, value: str, stage: Stage) -> StageInput:
        for upstream in self.stages.values():  # `${stages.X.ref}` interpolated: map it back to its stage
            if upstream.output_ref == value and upstream.type.output != "none":
                return StageInput(stage=upstream.name)
        head, sep, tag = value.partition("@")
        owner = self.stage_of(head)
        if owner is not None:
            upstream = self.stages[owner]
            if sep and upstream.type.output not in ("checkpoint", "rounds"):
                raise self.fail(key, f"{value!r}: a {upstream.type.name} stage has no tags; write {owner}")
            if upstream.output_ref is None:
                raise self.fail(key, f"{value!r}: a {upstream.type.name} stage produces no model to read")
            return StageInput(stage=owner, tag=tag if sep else None)
        if head in self.raw["stages"]:
            problem = "is this stage itself" if head == stage.name else "comes later in the recipe"
            raise self.fail(key, f"{value!r}: stage {head!r} {problem}; a stage can only read earlier stages")
        if _looks_external(value) or (stage.type.reads_presets and self.is_preset(value)):
            return StageInput(external=value)
        earlier = ", ".join(self.stages) or "none"
        raise self.fail(
            key,
            f"{value!r} is not an earlier stage{did_you_mean(head, self.stages)} (earlier stages: {earlier}); "
            "write NAME@TAG for a store reference, a path, or hf://ORG/REPO",
        )

    def stage_of(self, head: str) -> str | None:
        """The earlier stage a reference head names: by stage name, or by the artifact name it writes."""
        if head in self.stages:
            return head
        for stage in self.stages.values():
            if stage.artifact == head:
                return stage.name
        return None

    @staticmethod
    def is_preset(value: str) -> bool:
        return value in list_models()

    def concrete_ref(self, target: StageInput) -> str:
        upstream = self.stages[target.stage]
        if target.tag is not None:
            return f"{upstream.artifact}@{target.tag}"
        return upstream.output_ref

    def output_ref(self, stage: Stage) -> str | None:
        output = stage.type.output
        if output == "checkpoint":
            return f"{stage.artifact}@{DEFAULT_TAG}"
        if output == "rounds":
            return f"{stage.artifact}@{_default_tag(stage)}"
        if output == "folder":
            return stage.options["out"]
        source = stage.type.positional and stage.options.get(stage.type.positional)
        return source or None  # evaluate / flops: reading them means reading what they read


def _plain_options(stage: Stage) -> dict:
    return {key: value for key, value in stage.options.items() if value is not None}


def _plain(value: Any) -> Any:
    """A typed option as YAML and JSON write it: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _by_field(stype: StageType, options: dict) -> dict:
    """Recipe options under their settings field names (`from` -> `ref`)."""
    return {stype.options[key].field: value for key, value in options.items()}


def _default_tag(stage: Stage) -> str:
    if stage.type.output == "rounds":
        return f"round-{stage.settings.rounds}"
    return DEFAULT_TAG


def _looks_external(value: str) -> bool:
    return (
        value.startswith(("hf://", "/", ".", "~"))
        or "/" in value
        or value.endswith(".safetensors")
        or ("@" in value and not value.endswith("@"))
    )


