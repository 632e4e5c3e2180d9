"""The doctor as a Prefect flow: the same checks and table as `richpref doctor`, plus the table as a
Prefect table artifact (and its lines in the flow run's log)."""
from __future__ import annotations

import re

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from richpref.doctor.measure import format_report, run_doctor, table_rows
from richpref.schemas.config import load_profile


@flow(name="doctor")
def doctor(profile: str = "tiny", items: int = 8, project_items: int = 100_000, workers: int = 1,
           overrides: list[str] | None = None, models_root: str | None = None) -> dict:
    """Load every model of `profile`, run `items` items through every stage, project the full run."""
    logger = get_run_logger()
    prof = load_profile(profile, overrides, models_root)
    report = run_doctor(prof, items=items, project_items=project_items, workers=workers, progress=logger.info)
    key = re.sub(r"[^a-z0-9-]+", "-", f"doctor-{prof.name}".lower()).strip("-")
    create_table_artifact(table_rows(report), key=key,
                          description=f"richpref doctor: {prof.name}, {items} item(s) projected to {project_items}")
    logger.info("\n%s", format_report(report))
    return report.to_dict()


if __name__ == "__main__":
    import sys

    doctor(profile=sys.argv[1] if len(sys.argv) > 1 else "tiny")
