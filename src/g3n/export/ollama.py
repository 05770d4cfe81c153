"""Ollama Modelfiles beside a GGUF export, with Gemma 3n's template and Google's sampling."""

from __future__ import annotations

from pathlib import Path

from g3n.errors import G3nError

# Ollama's Gemma 3 template, as g3n's format_chat: the system prompt (Ollama passes all system
# messages joined as .System and keeps them in .Messages) is folded into the first user turn,
# followed by a blank line; system messages make no turn of their own. No BOS: llama.cpp adds it.
OLLAMA_TEMPLATE = """{{- $system := $.System }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ $system = "" }}{{ end }}{{ .Content }}<end_of_turn>
{{ if $last }}<start_of_turn>model
{{ end }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- end }}"""


def modelfile_path(gguf_path: Path, overwrite: bool = False) -> Path:
    """The Modelfile beside `gguf_path`, refused when it exists (without `overwrite`) or is not a
    file: checked before the GGUF is written."""
    path = Path(gguf_path).with_name("Modelfile")
    if path.exists() and not overwrite:
        raise G3nError(f"{path}: exists (pass --overwrite to replace it)")
    if path.exists() and not path.is_file():
        raise G3nError(f"{path}: not a file; the Modelfile is written beside the GGUF (choose another --out)")
    if path.exists() and not path.read_text(errors="replace").startswith(f"FROM ./{Path(gguf_path).name}\n"):
        raise G3nError(f"{path}: not the Modelfile of an earlier export to {Path(gguf_path).name}; --overwrite "
                       "replaces only that (choose another --out)")  # fmt: skip
    return path


def write_modelfile(gguf_path: Path, overwrite: bool = False, projector: Path | None = None) -> Path:
    """An Ollama Modelfile beside the GGUF: FROM, Gemma's template, stop token, Google's sampling.
    A vision projector (mmproj GGUF) is a second FROM line: Ollama keeps a GGUF of architecture
    `clip` as the model's projector."""
    from g3n.checkpoint.atomic import write_atomic

    path = modelfile_path(gguf_path, overwrite)
    text = (
        f"FROM ./{gguf_path.name}\n"
        + (f"FROM ./{projector.name}\n" if projector is not None else "")
        + f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n'
        'PARAMETER stop "<end_of_turn>"\n'
        "PARAMETER temperature 1\nPARAMETER top_k 64\nPARAMETER top_p 0.95\nPARAMETER min_p 0\n"
    )
    write_atomic(path, lambda p: p.write_text(text))
    return path
