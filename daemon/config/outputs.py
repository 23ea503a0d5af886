"""The `outputs:` list: where events go besides the ZeroMQ publisher and the journal (docs/outputs.md).

Each entry has a `type` and an `id` (default: its type; unique in the list), and is reloadable on its own: a reload
starts the entries that arrive, stops those that leave, and restarts those whose settings changed, leaving the
others running. A new output type is one model here (added to `OutputConfig`) and one module in vigild.outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from vigild.plugin import MAX_NAME_LENGTH

OutputId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]+$", max_length=MAX_NAME_LENGTH)]


class OutputEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    id: OutputId | None = Field(None, description="The output's name in the status and in the journal's cursors; "
                                "default: its type. Unique among the outputs.")  # fmt: skip
    queue_size: int = Field(10_000, ge=1, le=1_000_000, description="Events waiting for the output at most; "
                            "beyond, a catching-up output reads them from the journal, another drops them (counted).")
    catch_up: bool = Field(
        True,
        description="After a stop, a reload or a queue that ran over, deliver what it missed from the journal, from "
        "the last event it delivered (stored in the journal under its id), then live, in order. Needs the journal.",
    )

    @property
    def name(self) -> str:
        return self.id or self.type  # type: ignore[attr-defined]


class FileOutputConfig(OutputEntry):
    """Every event's wire JSON, one per line, appended to a file (JSON Lines)."""

    type: Literal["file"]
    path: Path = Field(description="The file the events are appended to (created 0640; relative: to the daemon's "
                       "working directory).")  # fmt: skip
    fsync: bool = Field(False, description="Sync the file to disk after each batch (slower; survives a power cut).")


OutputConfig = FileOutputConfig
"""Every output type's model; with a second type: `Annotated[A | B, Field(discriminator="type")]`."""
