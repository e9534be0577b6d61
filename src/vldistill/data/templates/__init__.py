"""The prompt template library shipped with vldistill: a few hundred zero-shot prompt templates, each
with `{}` for the class name, grouped by domain (one `<domain>.txt` file here per domain, its first
`#` line describing it), and the `eval.templates` entries that name library domains or template files."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

LIBRARY_DIR = Path(__file__).parent
LIBRARY_PREFIX = "library:"  # eval.templates entry: every template of a domain (or of `all`)
FILE_PREFIX = "file:"  # eval.templates entry: the templates of a file, one per line
ALL_DOMAINS = "all"


def _parse(path: Path) -> tuple[str, list[str]]:
    """(description, templates) of one library file: `#` lines describe, other non-empty lines are templates."""
    description, templates = "", []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        text = line.strip()
        if text.startswith("#"):
            description = description or text.lstrip("# ")
            continue
        if not text:
            continue
        if text.count("{}") != 1:
            raise ValueError(f"{path}:{number}: template {text!r} must hold exactly one '{{}}' for the class name")
        templates.append(text)
    return description, templates


@lru_cache(maxsize=1)
def _library() -> dict[str, tuple[str, list[str]]]:
    return {path.stem: _parse(path) for path in sorted(LIBRARY_DIR.glob("*.txt"))}


def library_domains() -> dict[str, str]:
    """Every library domain, in name order, with its one-line description."""
    return {domain: description for domain, (description, _) in _library().items()}


def unknown_domains(domains: Iterable[str]) -> list[str]:
    """The names of `domains` that are not library domains (`all` is known)."""
    known = _library()
    return [domain for domain in domains if domain != ALL_DOMAINS and domain not in known]


def _domain_error(unknown: Sequence[str], where: str) -> ValueError:
    names = ", ".join(repr(domain) for domain in unknown)
    return ValueError(f"{where}: unknown template domain(s) {names}; domains: {', '.join([*_library(), ALL_DOMAINS])}")


def template_library(domains: Optional[Sequence[str]] = None, where: str = "domains") -> dict[str, list[str]]:
    """The library's templates of `domains` (None or `all` among them: every domain), domain -> templates,
    in the order given (every domain: name order); a ValueError naming `where` for an unknown domain."""
    library = _library()
    unknown = unknown_domains(domains or [])
    if unknown:
        raise _domain_error(unknown, where)
    if domains is None or ALL_DOMAINS in domains:
        domains = list(library)
    return {domain: list(library[domain][1]) for domain in dict.fromkeys(domains)}


def library_templates(domains: Optional[Sequence[str]] = None, where: str = "domains") -> list[str]:
    """The templates of `domains` (see `template_library`) as one list, each template once, in domain order."""
    chosen = template_library(domains, where)
    return list(dict.fromkeys(template for templates in chosen.values() for template in templates))


def read_template_file(path: Union[str, Path]) -> list[str]:
    """Prompt templates, one per non-empty line of `path` (lines starting with `#` are comments), each
    with `{}` for the class name; a one-line error naming the file and line otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"templates file {path} does not exist")
    _, templates = _parse(path)
    if not templates:
        raise ValueError(f"templates file {path} has no templates")
    return templates


def check_template_entries(entries: Sequence[str], where: str) -> None:
    """Raise a ValueError naming `where` and the entry of `eval.templates` that `expand_templates` cannot
    use: a template without `{}`, an unknown `library:` domain or a missing `file:`."""
    for entry in entries:
        if entry.startswith(LIBRARY_PREFIX):
            domains = [d.strip() for d in entry[len(LIBRARY_PREFIX):].split(",")]
            unknown = unknown_domains(domains)
            if unknown or not all(domains):
                raise _domain_error(unknown or [entry], f"{where}: {entry!r}")
        elif entry.startswith(FILE_PREFIX):
            if not Path(entry[len(FILE_PREFIX):]).is_file():
                raise ValueError(f"{where}: templates file {entry[len(FILE_PREFIX):]!r} does not exist")
        elif "{}" not in entry:
            raise ValueError(f"{where}: {entry!r} has no '{{}}' for the class name (nor is it library:<domain> or file:<path>)")


def expand_templates(entries: Sequence[str]) -> list[str]:
    """The prompt templates `eval.templates` names: each entry is a template with `{}`, `library:<domain>`
    (several: `library:general,objects`; every domain: `library:all`) for that library domain's templates,
    or `file:<path>` for a templates file's (e.g. one `vldistill templates search` wrote); each template
    once, in entry order."""
    check_template_entries(entries, "templates")
    templates: list[str] = []
    for entry in entries:
        if entry.startswith(LIBRARY_PREFIX):
            templates += library_templates([d.strip() for d in entry[len(LIBRARY_PREFIX):].split(",")])
        elif entry.startswith(FILE_PREFIX):
            templates += read_template_file(entry[len(FILE_PREFIX):])
        else:
            templates.append(entry)
    return list(dict.fromkeys(templates))
