"""OpenAI's `POST /v1/audio/transcriptions` and `POST /v1/audio/translations` (multipart forms: `file`,
`model`, `language`, `prompt`, `response_format`, `temperature`) over Gemma 3n's audio tower.

Gemma 3n has no transcription head: it transcribes and translates because it is asked to, so each
request becomes one chat turn, the clip then an instruction in the words Google publishes for
speech recognition (ASR) and speech translation (AST), and runs through the same scheduler as chat.
The prompts and their sources are in docs/serve.md (Audio).

A form can be posted cross-site by any web page without a CORS preflight, which the JSON routes rely
on (app.Guard); so these routes refuse a browser page from another origin themselves, before reading
the body, unless --cors-origin allows it.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import re
import secrets

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from g3n.errors import G3nError
from g3n.inference.backends import check_modalities
from g3n.inference.sampling import SamplingParams
from g3n.media import read_audio
from g3n.serve.errors import APIError, bad, busy
from g3n.serve.scheduler import Job, QueueFull

FORM_PATHS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
FORMATS = ("json", "text")  # verbose_json, srt and vtt need timestamps, which Gemma 3n does not give
MAX_FIELDS = 32  # form fields besides the file (OpenAI sends a handful; include[] and the like repeat)

# Google's prompts (docs/serve.md says where they are published). {language}: a name, e.g. "French".
ASR = ("Transcribe the following speech segment in {language} into {language} text.\n\n"
       "Follow these specific instructions for formatting the answer:\n"
       "* Only output the transcription, with no newlines.\n"
       "* When transcribing numbers, write the digits, i.e. write 1.7 and not one point seven, "
       "and write 3 instead of three.")  # fmt: skip
AST = ("Transcribe the following speech segment in {source}, then translate it into {target}.\n"
       "When formatting the answer, first output the transcription in {source}, then one newline, "
       "then output the string '{target}: ', then the translation in {target}.")  # fmt: skip
# Without a language the templates name none: the model is asked for the language it hears.
ASR_ANY = ASR.replace("in {language} into {language} text", "in its original language")
SOURCE_ANY = "its original language"
CONTEXT = "\n\nContext (text that came before this segment, or names and terms it may contain; follow its spelling):\n"
TARGET = "English"  # OpenAI's translations always translate into English

# ISO 639-1 codes and the names the prompts use ("_": a space).
_CODES = """
aa=Afar ab=Abkhazian ae=Avestan af=Afrikaans ak=Akan am=Amharic an=Aragonese ar=Arabic as=Assamese av=Avaric
ay=Aymara az=Azerbaijani ba=Bashkir be=Belarusian bg=Bulgarian bi=Bislama bm=Bambara bn=Bengali bo=Tibetan
br=Breton bs=Bosnian ca=Catalan ce=Chechen ch=Chamorro co=Corsican cr=Cree cs=Czech cu=Church_Slavonic cv=Chuvash
cy=Welsh da=Danish de=German dv=Dhivehi dz=Dzongkha ee=Ewe el=Greek en=English eo=Esperanto es=Spanish et=Estonian
eu=Basque fa=Persian ff=Fulah fi=Finnish fj=Fijian fo=Faroese fr=French fy=Western_Frisian ga=Irish
gd=Scottish_Gaelic gl=Galician gn=Guarani gu=Gujarati gv=Manx ha=Hausa he=Hebrew hi=Hindi ho=Hiri_Motu hr=Croatian
ht=Haitian_Creole hu=Hungarian hy=Armenian hz=Herero ia=Interlingua id=Indonesian ie=Interlingue ig=Igbo
ii=Sichuan_Yi ik=Inupiaq io=Ido is=Icelandic it=Italian iu=Inuktitut ja=Japanese jv=Javanese ka=Georgian kg=Kongo
ki=Kikuyu kj=Kuanyama kk=Kazakh kl=Kalaallisut km=Khmer kn=Kannada ko=Korean kr=Kanuri ks=Kashmiri ku=Kurdish
kv=Komi kw=Cornish ky=Kyrgyz la=Latin lb=Luxembourgish lg=Ganda li=Limburgish ln=Lingala lo=Lao lt=Lithuanian
lu=Luba-Katanga lv=Latvian mg=Malagasy mh=Marshallese mi=Maori mk=Macedonian ml=Malayalam mn=Mongolian mr=Marathi
ms=Malay mt=Maltese my=Burmese na=Nauru nb=Norwegian_Bokmål nd=North_Ndebele ne=Nepali ng=Ndonga nl=Dutch
nn=Norwegian_Nynorsk no=Norwegian nr=South_Ndebele nv=Navajo ny=Chichewa oc=Occitan oj=Ojibwe om=Oromo or=Odia
os=Ossetian pa=Punjabi pi=Pali pl=Polish ps=Pashto pt=Portuguese qu=Quechua rm=Romansh rn=Kirundi ro=Romanian
ru=Russian rw=Kinyarwanda sa=Sanskrit sc=Sardinian sd=Sindhi se=Northern_Sami sg=Sango si=Sinhala sk=Slovak
sl=Slovenian sm=Samoan sn=Shona so=Somali sq=Albanian sr=Serbian ss=Swati st=Southern_Sotho su=Sundanese sv=Swedish
sw=Swahili ta=Tamil te=Telugu tg=Tajik th=Thai ti=Tigrinya tk=Turkmen tl=Tagalog tn=Tswana to=Tongan tr=Turkish
ts=Tsonga tt=Tatar tw=Twi ty=Tahitian ug=Uyghur uk=Ukrainian ur=Urdu uz=Uzbek ve=Venda vi=Vietnamese vo=Volapük
wa=Walloon wo=Wolof xh=Xhosa yi=Yiddish yo=Yoruba za=Zhuang zh=Chinese zu=Zulu
"""
LANGUAGES = {code: name.replace("_", " ") for code, name in re.findall(r"([a-z]{2})=(\S+)", _CODES)}


def instruction(task: str, language: str | None, prompt: str = "") -> str:
    """The text that follows the clip in the user's turn. task: "transcribe" or "translate";
    language: the spoken language's name, or None when the request gives none."""
    if task == "transcribe" or language == TARGET:  # English translated into English is its transcript
        text = ASR_ANY if language is None else ASR.format(language=language)
    else:
        text = AST.format(source=language or SOURCE_ANY, target=TARGET)
    return text + CONTEXT + prompt.strip() if prompt.strip() else text


def translation_of(reply: str) -> str:
    """The English part of an AST reply (after the last line starting 'English:'); the whole reply
    when the model answered with the translation alone."""
    marker = TARGET + ":"
    lines = reply.splitlines()
    for n in range(len(lines) - 1, -1, -1):
        if lines[n].lstrip().startswith(marker):
            rest = [lines[n].lstrip()[len(marker) :], *lines[n + 1 :]]
            return "\n".join(rest).strip()
    return reply.strip()


def language_name(value) -> str | None:
    """The name of an ISO 639-1 code ("fr", "FR", "fr-CA": French); None for none given."""
    if value is None or value == "":
        return None
    code = value.strip().lower().replace("_", "-").partition("-")[0] if isinstance(value, str) else None
    if code not in LANGUAGES:
        raise bad(f"'language' must be an ISO 639-1 code such as 'en' or 'fr', not {str(value)[:40]!r}", "language")
    return LANGUAGES[code]


def _temperature(value) -> float:
    """OpenAI's range, 0 to 1; 0 (the default) decodes greedily."""
    if value is None or value == "":
        return 0.0
    try:
        t = float(value)
    except (TypeError, ValueError):
        raise bad(f"'temperature' must be a number between 0 and 1, not {str(value)[:40]!r}", "temperature") from None
    if not 0 <= t <= 1:  # NaN fails too
        raise bad(f"'temperature' must be between 0 and 1, got {value}", "temperature")
    return t


def cross_origin(request: Request, origins) -> str | None:
    """The origin of a browser page on another site that sent this request (None: not one, or one
    allowed with --cors-origin). Clients outside a browser send no Origin."""
    if "*" in origins:
        return None
    origin = request.headers.get("origin")
    if origin is None:  # browsers send one with every cross-site POST; Sec-Fetch-Site says so too
        site = request.headers.get("sec-fetch-site")
        return f"Sec-Fetch-Site: {site}" if site in ("cross-site", "same-site") else None
    if origin in origins:
        return None
    own = origin.partition("://")[2].lower() == request.headers.get("host", "").lower()
    return None if own else origin[:100]


def audio_routes(engine, names: list[str], scheduler, max_tokens: int, max_prompt: int, read_body, media_gate,
                 cors_origins=()):  # fmt: skip
    """(transcriptions, translations): the handlers over the app's engine and scheduler. `names`: the
    served model ids (the base model, then LoRA adapters); `read_body`: the app's bounded body reader;
    `media_gate`: the semaphore bounding requests that hold decoded media."""

    def prepare(data: bytes, text: str) -> tuple[list[int], dict | None]:
        """Decode the clip and build the prompt (in a worker thread, at most `media_gate` at once)."""
        with media_gate:
            try:
                samples, rate = read_audio(io.BytesIO(data), "file")
            except G3nError as e:
                hint = "; send WAV, FLAC, MP3, OGG or AIFF" if "not an audio file" in str(e) else ""
                raise bad(f"{e}{hint}", "file") from None
            if samples.shape[0] == 0:
                raise bad("file: the audio is empty", "file")
            clip = {"type": "audio", "audio": samples.mean(axis=1), "sampling_rate": int(rate)}
            del samples
            try:
                ids, media = engine.prepare([{"role": "user", "content": [clip, {"type": "text", "text": text}]}])
            except G3nError as e:
                raise bad(str(e), "file") from None
        if len(ids) > max_prompt:
            raise bad(f"the prompt (the clip, the instruction and 'prompt') is {len(ids)} tokens; this server takes "
                      f"at most {max_prompt} (--max-prompt-tokens)", "prompt", "context_length_exceeded")  # fmt: skip
        return ids, media

    async def form(request: Request):
        """The form's fields, after the checks that need no parsing: origin, type, size."""
        if origin := cross_origin(request, cors_origins):
            raise APIError(403, f"a web page on another origin ({origin}) may not post audio to this server; start "
                           "g3n serve with --cors-origin ORIGIN to allow a browser app there", code="cross_origin")  # fmt: skip
        if not any(importlib.util.find_spec(m) for m in ("python_multipart", "multipart")):
            raise APIError(501, "the audio routes read multipart forms with python-multipart, which is not installed: "
                           "pip install 'g3n[serve]'", type="server_error", code="unsupported")  # fmt: skip
        kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if kind != "multipart/form-data":
            raise APIError(415, f"POST {request.url.path} takes a multipart/form-data body (the audio as 'file'), "
                           f"got {kind or 'none'!r}", code="unsupported_media_type")  # fmt: skip
        raw = await read_body(request)  # bounded in size and time before anything is parsed

        async def replay():
            return {"type": "http.request", "body": raw, "more_body": False}

        try:
            fields = await Request(request.scope, replay).form(max_files=1, max_fields=MAX_FIELDS)
        except HTTPException as e:
            raise bad(f"the multipart form could not be read: {e.detail}", code="invalid_multipart") from None
        return fields

    async def handle(request: Request, task: str):
        fields = await form(request)
        model = fields.get("model")
        if not isinstance(model, str) or not model:
            raise bad("'model' is required: the id from GET /v1/models", "model")
        if model not in names:
            raise APIError(404, f"The model '{model}' does not exist; this server runs {', '.join(map(repr, names))}",
                           param="model", code="model_not_found")  # fmt: skip
        try:
            check_modalities(engine, {"audio"})
        except G3nError as e:
            raise bad(str(e), "model", "unsupported_modality") from None
        fmt = fields.get("response_format") or "json"
        if fmt not in FORMATS:
            raise bad(f"'response_format' {str(fmt)[:40]!r} is not supported: json or text (verbose_json, srt and "
                      "vtt need timestamps, which Gemma 3n does not give)", "response_format", "unsupported")  # fmt: skip
        for name in ("language", "prompt", "temperature", "stream"):
            if isinstance(fields.get(name), UploadFile):
                raise bad(f"'{name}' must be a form field, not a file", name)
        language = language_name(fields.get("language"))
        temperature = _temperature(fields.get("temperature"))
        if fields.get("stream", "false").strip().lower() not in ("false", "0", ""):
            raise bad("'stream' is not supported on the audio routes: the text comes whole", "stream", "unsupported")
        upload = fields.get("file")
        if not isinstance(upload, UploadFile):
            raise bad("'file' is required: the audio file, as a multipart file upload", "file")
        data = await upload.read()
        await upload.close()
        if not data:
            raise bad("file: the file is empty", "file")
        text = instruction(task, language, fields.get("prompt") or "")
        ids, media = await run_in_threadpool(prepare, data, text)
        del data
        params = SamplingParams(temperature=temperature, max_new_tokens=max_tokens, seed=secrets.randbits(31))
        adapter = None if model == engine.name else model
        job = Job(ids, params, [], asyncio.get_running_loop(), media, adapter=adapter)
        try:
            scheduler.submit(job)
        except QueueFull as e:
            raise busy(str(e)) from None
        result = await job.whole(request)
        if result is None:  # the client left
            return Response()
        reply, _, _, count = result
        out = translation_of(reply) if task == "translate" and language != TARGET else reply.strip()
        if fmt == "text":
            return PlainTextResponse(out)
        usage = {"type": "tokens", "input_tokens": len(ids), "output_tokens": count,
                 "total_tokens": len(ids) + count}  # fmt: skip
        return JSONResponse({"text": out, "usage": usage})

    async def transcriptions(request: Request):
        return await handle(request, "transcribe")

    async def translations(request: Request):
        return await handle(request, "translate")

    return transcriptions, translations
