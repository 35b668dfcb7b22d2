"""Evaluation and calibration texts: the built-in corpora, or any text file."""

from pathlib import Path

from slimserve.assets import fetch

SOTU_EVAL_FROM_YEAR = 1990  # evaluation: addresses from 1990 on; calibration uses the earlier ones


def sotu_text(first_year: int = SOTU_EVAL_FROM_YEAR, last_year: int = 9999) -> str:
    """State of the Union addresses in [first_year, last_year], in year order, joined by blank lines."""
    files = sorted(fetch("sotu").glob("*.txt"))  # names start with the year, so this is year order
    chosen = [f for f in files if first_year <= int(f.name[:4]) <= last_year]
    if not chosen:
        raise ValueError(f"no State of the Union address between {first_year} and {last_year}")
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in chosen)


def moby_dick_text() -> str:
    files = sorted(fetch("moby-dick").glob("chapter_*.txt"), key=lambda f: int(f.stem.split("_")[1]))
    return "\n\n".join(f.read_text(encoding="utf-8").strip() for f in files)


DATASETS = {
    "sotu": sotu_text,
    "sotu-calib": lambda: sotu_text(0, SOTU_EVAL_FROM_YEAR - 1),
    "moby-dick": moby_dick_text,
}


def load_text(dataset: str) -> str:
    """A built-in dataset by name (sotu, sotu-calib, moby-dick) or a UTF-8 text file's contents."""
    if dataset in DATASETS:
        return DATASETS[dataset]()
    path = Path(dataset)
    if not path.is_file():
        raise FileNotFoundError(f"dataset {dataset!r} is neither a built-in ({', '.join(DATASETS)}) nor a file")
    return path.read_text(encoding="utf-8")
