"""Export a scenario subgraph: ``torch.export`` with dynamic shapes, then an AOTInductor package.

::

    program = export_program(sub, example)                       # torch.export.ExportedProgram
    path = compile_package(program, "hp.pt2", "cpu", metadata=serving_metadata(sub, schema))
    scorer = load_package("hp.pt2")                              # refuses another torch's package
    predictor = Predictor(scorer.schema, {scorer.scenario: scorer})

:func:`export_scenario` is the first two steps in one call.

Dynamic dimensions (named ``torch.export.Dim``, so that every tensor's B is the same symbol):
the request count ``B``, each sequence's context length ``L_q``, the candidate count ``M`` and
each multi-hot bag width ``K_f``. The feature counts ``F_q``, ``F_s``, ``D_s`` are static. The
tracing example is a padded copy with every dynamic dimension at least 2, so that export does not
specialise a dimension on a 0/1 value; the program then takes any size (``collate_requests``
never makes a 0-sized one).

The package holds the serving metadata INSIDE the ``.pt2``: it is AOTInductor's own metadata
(``inductor_configs["aot_inductor.metadata"]``), string -> string, written into the archive's
``<model>_metadata.json`` and into the compiled library. So Python reads it without loading the
library (``AOTIModelPackageLoader.load_metadata_from_package``) and a C++ server reads the same
keys from ``torch::inductor::AOTIModelPackageLoader::get_metadata()``::

    mtfm_rec.format_version   "1"
    mtfm_rec.torch_version    torch.__version__ of the build (a package runs only on that torch)
    mtfm_rec.scenario         the scenario name
    mtfm_rec.tasks            JSON list, the order of the output's last axis
    mtfm_rec.schema           dataset.yaml text (DatasetSchema.to_yaml)
    mtfm_rec.layout           JSON input layout (:func:`input_layout`): sequences in order with
                              their feature columns, categorical / multi-hot / dense columns of
                              the scenario, and ``flat_inputs``: the names of the flattened
                              tensors in the order the compiled model (and a C++ caller) takes them
    mtfm_rec.bf16             "true" when the subgraph's weights are bfloat16
    mtfm_rec.device           "cpu" or "cuda"
    mtfm_rec.run_config       optional: the training run's config.yaml text (data, aggregation,
                              split times), so ``replay`` can rebuild the evaluation split

Inputs (``mtfm_rec.serve.request.ScenarioInputs``): int64 ids/timestamps/lengths, float32 dense
features; the output is ``[B, M, num_tasks]`` float32 probabilities.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Set, Tuple, Union

import torch
import torch._inductor
import yaml
from torch.export import Dim, ExportedProgram
from torch.export.passes import move_to_device_pass
from torch.utils._pytree import tree_map

# registers the C++ attention kernel's operator, which a compiled CPU package calls
import mtfm_rec.kernels.hstu_attention.cpu  # noqa: F401
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.serve.request import ScenarioInputs
from mtfm_rec.serve.subgraph import ScenarioModel, ServingError

FORMAT_VERSION = "1"
_PREFIX = "mtfm_rec."
_KEYS = ("format_version", "torch_version", "scenario", "tasks", "schema", "layout", "bf16", "device")
_MODEL_NAME = "model"  # the model name aoti_compile_and_package gives its one model
PARITY_ATOL = 1e-5  # exported program vs eager on the example (fp32)


class PackageError(ServingError):
    """A ``.pt2`` that cannot be served here (missing metadata, other torch version, ...)."""


# ---------------------------------------------------------------------------- metadata
def input_layout(schema: DatasetSchema, scenario: str) -> Dict[str, Any]:
    """The order of a scenario's inputs (``mtfm_rec.serve.request`` module docstring)."""
    spec = schema.scenario(scenario)
    sequences = [
        {"name": q.name, "kind": q.kind, "features": list(q.features)} for q in schema.ordered_sequences
    ]
    multi_hot = [{"group": g, "column": c, "pooling": p} for g, c, _, p in spec.multi_hot()]
    flat = [f"seq_ids/{q['name']}" for q in sequences] + [f"seq_ts/{q['name']}" for q in sequences]
    flat += [f"seq_len/{q['name']}" for q in sequences] + ["cand_ids"]
    flat += [f"cand_bags/{m['column']}" for m in multi_hot] + ["cand_dense", "cand_ts", "cand_count"]
    return {
        "sequences": sequences,
        "categorical": [{"group": g, "column": c} for g, c, _ in spec.categorical()],
        "multi_hot": multi_hot,
        "dense": list(spec.dense_features),
        "flat_inputs": flat,
    }


@dataclass(frozen=True)
class ServingMetadata:
    """What a server needs beside the compiled model (module docstring for the stored keys)."""

    scenario: str
    tasks: List[str]
    schema_yaml: str
    layout: Dict[str, Any]
    bf16: bool
    device: str = "cpu"
    torch_version: str = torch.__version__
    format_version: str = FORMAT_VERSION
    run_config: str = ""  # the run's config.yaml, when exported from a run directory

    @property
    def schema(self) -> DatasetSchema:
        return DatasetSchema.from_dict(yaml.safe_load(self.schema_yaml), source="<package schema>")

    def to_strings(self) -> Dict[str, str]:
        """The ``aot_inductor.metadata`` entries (string -> string)."""
        values = {
            "format_version": self.format_version,
            "torch_version": self.torch_version,
            "scenario": self.scenario,
            "tasks": json.dumps(self.tasks),
            "schema": self.schema_yaml,
            "layout": json.dumps(self.layout),
            "bf16": "true" if self.bf16 else "false",
            "device": self.device,
        }
        if self.run_config:
            values["run_config"] = self.run_config
        return {_PREFIX + k: v for k, v in values.items()}

    @classmethod
    def from_strings(cls, raw: Dict[str, str], source: str) -> "ServingMetadata":
        """Parses :meth:`to_strings`' entries of the package ``source``.

        Raises:
            PackageError: a key is missing or the format version is another one.
        """
        missing = [_PREFIX + k for k in _KEYS if _PREFIX + k not in raw]
        if missing:
            raise PackageError(
                f"{source}: no mtfm_rec serving metadata (missing {missing}): not a package written "
                "by mtfm_rec.serve.export.compile_package"
            )
        v = {k: raw[_PREFIX + k] for k in _KEYS}
        if v["format_version"] != FORMAT_VERSION:
            raise PackageError(
                f"{source}: {_PREFIX}format_version={v['format_version']!r}, this mtfm_rec reads "
                f"{FORMAT_VERSION!r}; export the package again"
            )
        return cls(
            scenario=v["scenario"],
            tasks=list(json.loads(v["tasks"])),
            schema_yaml=v["schema"],
            layout=json.loads(v["layout"]),
            bf16=v["bf16"] == "true",
            device=v["device"],
            torch_version=v["torch_version"],
            format_version=v["format_version"],
            run_config=raw.get(_PREFIX + "run_config", ""),
        )


def serving_metadata(sub: ScenarioModel, schema: DatasetSchema) -> ServingMetadata:
    """The metadata of ``sub``'s package; ``schema`` must be the one ``sub`` was extracted with.

    Raises:
        ServingError: ``sub``'s sequence, feature or task order is not ``schema``'s.
    """
    spec = schema.scenario(sub.scenario)
    expected = (
        [[f"seq/{q.name}/{f}" for f in q.features] for q in schema.ordered_sequences],
        [f"exp/{spec.name}/{g}/{c}" for g, c, _ in spec.categorical()],
        [(f"bag/{spec.name}/{g}/{c}", p) for g, c, _, p in spec.multi_hot()],
        list(spec.tasks),
    )
    if (sub.seq_keys, sub.cand_keys, sub.bag_keys, sub.tasks) != expected:
        raise ServingError(
            f"serving_metadata: scenario {sub.scenario!r}: the subgraph's sequences/features/tasks are "
            f"not those of schema {schema.name!r} ({schema.source}); pass the schema it was trained on"
        )
    bf16 = any(p.dtype == torch.bfloat16 for p in sub.parameters())
    return ServingMetadata(
        sub.scenario, list(spec.tasks), schema.to_yaml(), input_layout(schema, sub.scenario), bf16
    )


# ---------------------------------------------------------------------------- torch.export
def _pad(t: torch.Tensor, dim: int, size: int, fill: Union[int, float]) -> torch.Tensor:
    """``t`` grown along ``dim`` to at least ``size`` with ``fill``."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = size - t.shape[dim]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype, device=t.device)], dim=dim)


def trace_example(example: ScenarioInputs, at_least: int = 2) -> ScenarioInputs:
    """A copy of ``example`` with every dynamic dimension >= ``at_least``, padded as
    ``collate_requests`` pads: padded requests have no context and no candidate, padded context
    slots are past ``seq_len``, padded candidates past ``cand_count``, padded bag slots are -1."""
    n = at_least

    def rows(t: torch.Tensor, fill: Union[int, float] = 0) -> torch.Tensor:
        return _pad(t, 0, n, fill)

    return ScenarioInputs(
        seq_ids=[rows(_pad(t, 1, n, 0)) for t in example.seq_ids],
        seq_ts=[rows(_pad(t, 1, n, 0)) for t in example.seq_ts],
        seq_len=[rows(t) for t in example.seq_len],
        cand_ids=rows(_pad(example.cand_ids, 1, n, 0)),
        cand_bags=[rows(_pad(_pad(t, 1, n, -1), 2, n, -1), -1) for t in example.cand_bags],
        cand_dense=rows(_pad(example.cand_dense, 1, n, 0.0), 0.0),
        cand_ts=rows(_pad(example.cand_ts, 1, n, 0)),
        cand_count=rows(example.cand_count),
    )


def dynamic_shapes(sub: ScenarioModel) -> Tuple[Any, ...]:
    """``torch.export`` dynamic shapes of ``ScenarioModel.forward``'s arguments (module docstring)."""

    def name(prefix: str, i: int, label: str) -> str:  # Dim names must be identifiers
        return re.sub(r"\W", "_", f"{prefix}{i}_{label}")

    b, m = Dim("requests"), Dim("candidates")
    lens = [Dim(name("context", i, keys[0].split("/")[1])) for i, keys in enumerate(sub.seq_keys)]
    bags = [Dim(name("bag", i, key.split("/")[-1])) for i, (key, _) in enumerate(sub.bag_keys)]
    return (
        [{0: b, 1: length} for length in lens],
        [{0: b, 1: length} for length in lens],
        [{0: b} for _ in lens],
        {0: b, 1: m},
        [{0: b, 1: m, 2: k} for k in bags],
        {0: b, 1: m},
        {0: b, 1: m},
        {0: b},
    )


def _check_example(sub: ScenarioModel, example: ScenarioInputs) -> None:
    counts = {
        "seq_ids": len(example.seq_ids),
        "seq_ts": len(example.seq_ts),
        "seq_len": len(example.seq_len),
    }
    for field_name, n in counts.items():
        if n != len(sub.seq_keys):
            raise ServingError(
                f"example.{field_name}: {n} sequences, scenario {sub.scenario!r} takes {len(sub.seq_keys)}"
            )
    if len(example.cand_bags) != len(sub.bag_keys):
        raise ServingError(
            f"example.cand_bags: {len(example.cand_bags)} bags, scenario {sub.scenario!r} takes "
            f"{len(sub.bag_keys)} multi-hot features"
        )


@torch.no_grad()
def export_program(sub: ScenarioModel, example: ScenarioInputs, atol: float = PARITY_ATOL) -> ExportedProgram:
    """``torch.export`` of ``sub.forward`` with dynamic B, L_q, M and K_f (module docstring).

    Args:
        sub: the scenario subgraph (eval mode, as :func:`extract_subgraph` returns it).
        example: inputs of ``sub``'s scenario (``collate_requests``); any sizes: a padded copy
            (:func:`trace_example`) is traced.
        atol: the largest difference from eager allowed on ``example`` (a bf16 subgraph may
            need more than the fp32 default).

    Raises:
        ServingError: ``example`` does not fit ``sub``, or the program's output on ``example``
            differs from the eager one by more than ``atol``.
    """
    _check_example(sub, example)
    traced = trace_example(example)
    program = torch.export.export(sub, traced.as_args(), dynamic_shapes=dynamic_shapes(sub), strict=False)
    # the check runs the program on the caller's shapes, not the traced ones
    diff = (program.module()(*example.as_args()) - sub(*example.as_args())).abs().max().item()
    if not diff <= atol:
        raise ServingError(
            f"export_program: scenario {sub.scenario!r}: exported output differs from eager by {diff:.3g} "
            f"(> {atol}) on the example"
        )
    return program


# ---------------------------------------------------------------------------- AOTInductor
def _program_devices(program: ExportedProgram) -> Set[str]:
    """The device types of the program's weights and constants."""
    tensors = list(program.state_dict.values()) + list(program.constants.values())
    return {t.device.type for t in tensors if isinstance(t, torch.Tensor)}


def compile_package(
    program: ExportedProgram,
    path: str,
    device: Union[str, torch.device] = "cpu",
    *,
    metadata: ServingMetadata,
) -> str:
    """AOTInductor-compiles ``program`` for ``device`` into the ``.pt2`` package ``path``, with
    ``metadata`` inside (module docstring). Returns ``path``.

    Raises:
        ValueError: ``path`` does not end in ``.pt2`` (AOTInductor's rule).
    """
    if not str(path).endswith(".pt2"):
        raise ValueError(f"compile_package: path={path!r} must end in .pt2")
    target = torch.device(device)
    if _program_devices(program) - {target.type}:
        # the pass moves weights, example inputs and the device= of ops (arange, full) in place
        program = move_to_device_pass(copy.deepcopy(program), target)
    meta = dataclasses.replace(metadata, device=target.type)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    return str(
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=path,
            inductor_configs={"aot_inductor.metadata": meta.to_strings()},
        )
    )


def export_scenario(
    sub: ScenarioModel,
    schema: DatasetSchema,
    example: ScenarioInputs,
    path: str,
    device: Union[str, torch.device] = "cpu",
    run_config: str = "",
) -> str:
    """:func:`export_program` then :func:`compile_package` (metadata from ``sub`` and ``schema``,
    plus the run's config YAML ``run_config`` when given)."""
    metadata = dataclasses.replace(serving_metadata(sub, schema), run_config=run_config)
    return compile_package(export_program(sub, example), path, device, metadata=metadata)


# ---------------------------------------------------------------------------- loading
def read_metadata(path: str) -> ServingMetadata:
    """The serving metadata of the package ``path``, read without loading its library.

    Raises:
        PackageError: no such file, not an AOTInductor package, no mtfm_rec metadata, or a
            package built by another torch version.
    """
    if not os.path.isfile(path):
        raise PackageError(f"{path}: no such package file")
    loader = torch._C._aoti.AOTIModelPackageLoader
    try:
        raw = loader.load_metadata_from_package(path, _MODEL_NAME)  # type: ignore[attr-defined]
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PackageError(f"{path}: not an AOTInductor .pt2 package ({first})") from exc
    meta = ServingMetadata.from_strings(dict(raw), path)
    if meta.torch_version != torch.__version__:
        raise PackageError(
            f"{path}: built by torch {meta.torch_version}, this is torch {torch.__version__}: an "
            "AOTInductor package runs only on the torch that compiled it; export it again here"
        )
    return meta


def _check_inputs(inputs: ScenarioInputs, layout: Dict[str, Any], source: str) -> None:
    """Shapes and dtypes of ``inputs`` against the package's layout (B, M, L_q, K_f free but
    consistent), so that a mismatch is an error naming the field, not a crash in the library."""
    seqs = layout["sequences"]
    for name, got, want in (
        ("seq_ids", len(inputs.seq_ids), len(seqs)),
        ("seq_ts", len(inputs.seq_ts), len(seqs)),
        ("seq_len", len(inputs.seq_len), len(seqs)),
        ("cand_bags", len(inputs.cand_bags), len(layout["multi_hot"])),
    ):
        if got != want:
            raise ServingError(f"inputs.{name}: {got} tensors, the package {source} takes {want}")
    checks: List[Tuple[str, torch.Tensor, Sequence[Union[str, int]], torch.dtype]] = []
    for i, q in enumerate(seqs):
        checks += [
            (
                f"seq_ids[{i}] ({q['name']})",
                inputs.seq_ids[i],
                ("B", f"L{i}", len(q["features"])),
                torch.int64,
            ),
            (f"seq_ts[{i}] ({q['name']})", inputs.seq_ts[i], ("B", f"L{i}"), torch.int64),
            (f"seq_len[{i}] ({q['name']})", inputs.seq_len[i], ("B",), torch.int64),
        ]
    checks.append(("cand_ids", inputs.cand_ids, ("B", "M", len(layout["categorical"])), torch.int64))
    for i, bag in enumerate(layout["multi_hot"]):
        checks.append(
            (f"cand_bags[{i}] ({bag['column']})", inputs.cand_bags[i], ("B", "M", f"K{i}"), torch.int64)
        )
    checks += [
        ("cand_dense", inputs.cand_dense, ("B", "M", len(layout["dense"])), torch.float32),
        ("cand_ts", inputs.cand_ts, ("B", "M"), torch.int64),
        ("cand_count", inputs.cand_count, ("B",), torch.int64),
    ]
    _check_shapes(checks, source)


def _check_shapes(
    checks: Sequence[Tuple[str, torch.Tensor, Sequence[Union[str, int]], torch.dtype]], source: str
) -> None:
    """Each (field, tensor, expected dims, dtype): an int dim must match, a named one must be the
    same in every tensor that names it."""
    sizes: Dict[str, Tuple[int, str]] = {}
    for field_name, t, dims, dtype in checks:
        if t.dtype != dtype or t.dim() != len(dims):
            raise ServingError(
                f"inputs.{field_name}: {t.dtype} {list(t.shape)}, the package {source} takes {dtype} "
                f"[{', '.join(map(str, dims))}]"
            )
        for axis, (want, got) in enumerate(zip(dims, t.shape)):
            if isinstance(want, int) and got != want:
                raise ServingError(
                    f"inputs.{field_name}: axis {axis} is {got}, the package {source} takes {want}"
                )
            if isinstance(want, str):
                seen = sizes.setdefault(want, (int(got), field_name))
                if seen[0] != got:
                    raise ServingError(
                        f"inputs.{field_name}: axis {axis} ({want}) is {got}, "
                        f"but {seen[0]} in inputs.{seen[1]}"
                    )


class ExportedScorer:
    """A loaded package: scores :class:`ScenarioInputs` like ``eager_scorer`` (a Predictor's
    scorer). Build it with :func:`load_package`."""

    def __init__(self, path: str, runner: Any, metadata: ServingMetadata) -> None:
        self.path, self.metadata, self._runner = path, metadata, runner
        self.schema = metadata.schema
        self.scenario, self.tasks = metadata.scenario, list(metadata.tasks)
        self.device = torch.device(metadata.device)

    def __call__(self, inputs: ScenarioInputs) -> torch.Tensor:
        """``[B, M, num_tasks]`` probabilities on ``inputs``' device (rows past ``cand_count``
        are padding)."""
        _check_inputs(inputs, self.metadata.layout, self.path)
        args = tree_map(lambda t: t.to(self.device), inputs.as_args())
        # the runner flattens the arguments with the call spec it was exported with (the same
        # nested lists), so it takes them as ScenarioModel.forward does
        out = self._runner(*args)
        return out.to(inputs.cand_ts.device)


def load_package(path: str) -> ExportedScorer:
    """The scorer of the package ``path`` (:func:`compile_package`).

    Raises:
        PackageError: see :func:`read_metadata`; or the compiled library's own metadata is not
            the archive's (an edited package).
    """
    meta = read_metadata(path)  # before loading the library: refuse another torch's build first
    runner = torch._inductor.aoti_load_package(path)
    embedded = {k: v for k, v in runner.get_metadata().items() if k.startswith(_PREFIX)}
    if embedded != meta.to_strings():
        raise PackageError(
            f"{path}: the compiled model's metadata is not the archive's: the package was edited"
        )
    return ExportedScorer(path, runner, meta)
