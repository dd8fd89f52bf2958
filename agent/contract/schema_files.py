"""JSON Schema files of the MQTT records, for integrators who are not Python: generated here, checked in, tested.

python -m lineguard.agent.contract.schema_files --write    regenerate agent/contract/schemas/*.schema.json
python -m lineguard.agent.contract.schema_files            exit 1 and name the files that differ
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import RECORDS, SCHEMA_VERSION, Record

SCHEMA_DIR = Path(__file__).with_name("schemas")


def schema_of(record_type: type[Record]) -> dict[str, object]:
    schema = record_type.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = f"https://lineguard.example/schemas/v{SCHEMA_VERSION}/{record_type.__name__}.schema.json"
    schema["x-max-bytes"] = record_type.MAX_BYTES
    return schema


def rendered() -> dict[str, str]:
    """File name -> file text, for every record."""
    return {
        f"{record.__name__}.schema.json": json.dumps(schema_of(record), indent=2, sort_keys=True) + "\n"
        for record in RECORDS
    }


def differences(folder: Path = SCHEMA_DIR) -> list[str]:
    """Names of schema files that are missing, stale or left over in `folder`."""
    wanted = rendered()
    present = {path.name for path in folder.glob("*.schema.json")}
    stale = [
        name for name, text in wanted.items() if not (folder / name).is_file() or (folder / name).read_text() != text
    ]
    return sorted(stale + sorted(present - set(wanted)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="regenerate the schema files")
    args = parser.parse_args(argv)
    if args.write:
        SCHEMA_DIR.mkdir(exist_ok=True)
        for stale in SCHEMA_DIR.glob("*.schema.json"):
            stale.unlink()
        for name, text in rendered().items():
            (SCHEMA_DIR / name).write_text(text)
        print(f"wrote {len(RECORDS)} schema files to {SCHEMA_DIR}")
        return 0
    problems = differences()
    for name in problems:
        print(f"{SCHEMA_DIR / name} differs from the code: run with --write", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
