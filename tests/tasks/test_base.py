"""A stage declares its output schema and its models (`Stage.schema`, `Stage.models`, `Stage.load`): the
table map, doctor's model references and doctor's loaders are read from the pipeline, so adding a
stage touches its module, its place in the pipeline and its config section, never doctor."""
from __future__ import annotations

from dataclasses import replace

import pyarrow as pa

from richpref.run.storage import RunStore
from richpref.schemas.config import load_profile
from richpref.tasks import ALL_STAGES, OUTPUTS, PIPELINE, REBUILD, REBUILD_OUTPUTS, RELABEL_DATASET, table_schemas
from richpref.tasks.base import ModelUse


def test_every_stage_declares_a_schema_and_its_models_exactly_when_it_loads_one():
    for stage in (*ALL_STAGES, *REBUILD, *RELABEL_DATASET):
        assert stage.schema is not None, stage.name
        assert (stage.models is not None) == (stage.load is not None) == stage.loads_model, stage.name


def test_the_table_map_follows_the_pipeline():
    tiny = load_profile("tiny")
    assert tuple(table_schemas(tiny)) == OUTPUTS
    rebuild = load_profile("tiny-rebuild")
    assert tuple(table_schemas(rebuild)) == REBUILD_OUTPUTS
    assert all(isinstance(s, pa.Schema) for s in table_schemas(tiny).values())


def test_each_stage_writes_the_schema_it_declares(finished_run, runs_dir, tiny_models):
    from test_curate_flow import OVERRIDES

    profile = load_profile("tiny", overrides=OVERRIDES, models_root=str(tiny_models))
    store = RunStore(str(runs_dir), "ref")
    for stage in ALL_STAGES:
        written = store.read_shard(stage.out, 0).schema
        declared = stage.output_schema(profile)
        assert written.names == declared.names, stage.name
        assert [f.type for f in written] == [f.type for f in declared], stage.name


def test_doctor_reads_its_model_lists_from_the_stages(monkeypatch):
    """A new stage that loads a model shows up in doctor's preflight and measured loads, with no doctor edit."""
    import richpref.tasks as tasks
    from richpref.doctor.checks import model_refs
    from richpref.doctor.measure import stage_loaders

    tiny = load_profile("tiny")
    loading = [s.name for s in PIPELINE if s.loads_model]
    assert list(dict.fromkeys(r.stage for r in model_refs(tiny))) == loading
    assert list(stage_loaders(tiny)) == loading

    extra = replace(PIPELINE[-1], name="upscale", output="upscaled", loads_model=True,
                    models=lambda p: [ModelUse("edit.model", "some/upscaler", "diffusers", p.edit)],
                    load=lambda p: ["some/upscaler"])
    monkeypatch.setattr(tasks, "ALL_STAGES", (*tasks.ALL_STAGES, extra))  # what stages_for(profile) returns
    assert [(r.stage, r.field, r.ref) for r in model_refs(tiny)][-1] == ("upscale", "edit.model", "some/upscaler")
    loaders = stage_loaders(tiny)
    assert list(loaders) == [*loading, "upscale"] and loaders["upscale"]() == ["some/upscaler"]


def test_until_names_a_stage_of_the_profiles_pipeline(tmp_path, capsys):
    """`curate --until` takes the profile's stages (no list of its own): a rebuild stage on an edit profile is refused."""
    from richpref.cli.commands import main

    assert main(["--data-dir", str(tmp_path), "curate", "--profile", "tiny", "--until", "ranked"]) == 2
    err = capsys.readouterr().err
    assert "--until ranked" in err and ", ".join(s.name for s in ALL_STAGES) in err
    assert not any(tmp_path.iterdir())  # refused before anything ran


def test_until_takes_a_table_name_as_status_and_inspect_show_it():
    # before, `--until pairs` (the table status lists last) was refused: its stage is named export
    from richpref.tasks import stages_for

    assert stages_for(load_profile("tiny"), "pairs") == ALL_STAGES
    assert [s.name for s in stages_for(load_profile("tiny"), "check")][-2:] == ["cutout", "check"]
    relabel = load_profile("tiny").model_copy(update={"pipeline": "relabel_dataset"})
    assert stages_for(relabel, "score") == RELABEL_DATASET[:2]
