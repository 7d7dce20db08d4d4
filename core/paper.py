"""The one model of a paper: what a technique implements and what a taxonomy node cites."""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# New-style arXiv ids: YYMM.NNNN (2007-2014) or YYMM.NNNNN (2015-): ASCII digits, month 01-12.
ARXIV_RE = re.compile(r"(0[7-9]|1[0-4])(0[1-9]|1[0-2])\.[0-9]{4}"
                      r"|(1[5-9]|[2-9][0-9])(0[1-9]|1[0-2])\.[0-9]{5}")


class Paper(BaseModel):
    """A publication: a title and an arXiv id (``url`` then defaults to its abstract page) or a URL."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    title: str = Field(min_length=1)
    year: int | None = Field(None, ge=1990, le=2100)
    arxiv: str | None = None
    url: str | None = None

    @field_validator("arxiv", mode="before")
    @classmethod
    def _check_arxiv(cls, value: Any) -> Any:
        if value is None:
            return value
        if isinstance(value, float):  # YAML read an unquoted id as a number (2306.11690 -> ...169)
            raise ValueError(f"arXiv id {value!r} must be a quoted string in YAML")
        if not isinstance(value, str) or not ARXIV_RE.fullmatch(value):
            raise ValueError(f"bad arXiv id {value!r}; expected YYMM.NNNNN like '2210.17323'")
        return value

    @model_validator(mode="before")
    @classmethod
    def _arxiv_url(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("arxiv") and not data.get("url") and isinstance(data["arxiv"], str):
            data = {**data, "url": f"https://arxiv.org/abs/{data['arxiv']}"}
        return data

    @property
    def link(self) -> str | None:
        """Where to read it (the arXiv abstract page, or the URL)."""
        return self.url

    def cite(self) -> str:
        where = f"arXiv:{self.arxiv}" if self.arxiv else (self.url or "")
        return f"{self.title} ({self.year}) {where}".strip()
