"""WordNet offline: NLTK reads the database files Debian's ``wordnet-base`` package installs
(``/usr/share/wordnet``), never a download.

NLTK only reads corpora below its own data paths and wants a ``lexnames`` file that Debian does
not ship (the table is compiled into Debian's library; it is the lexnames(5WN) manual page's), so
the files are copied once into a cache folder with ``lexnames`` beside them:
``$TAXOCLIP_WORDNET_CACHE`` or ``~/.cache/taxoclip/wordnet-3.0``. ``$TAXOCLIP_WORDNET`` points at
another copy of the WordNet 3.0 database files.
"""

from __future__ import annotations

import os
import shutil
import warnings
from functools import cache
from pathlib import Path

from taxoclip.errors import TaxoclipError

DEBIAN_WORDNET = Path("/usr/share/wordnet")
DATABASE_FILES = (
    *(f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")),
    *(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv")),
    "cntlist.rev",
)
# WordNet 3.0's lexicographer files, in file-number order (lexnames(5WN)); the last column is the
# syntactic category (1 noun, 2 verb, 3 adjective, 4 adverb).
_LEXNAME_TEXT = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body "
    "verb.change verb.cognition verb.communication verb.competition verb.consumption verb.contact "
    "verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative "
    "verb.weather adj.ppl "
)
LEXNAMES = _LEXNAME_TEXT.split()
CATEGORY = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
INSTALL_HINT = (
    "install WordNet's database: 'apt-get install wordnet-base' (Debian/Ubuntu), or set "
    "TAXOCLIP_WORDNET to a folder holding the WordNet 3.0 files (index.noun, data.noun, noun.exc, ...)"
)


def source_folder() -> Path:
    folder = Path(os.environ.get("TAXOCLIP_WORDNET") or DEBIAN_WORDNET)
    missing = [name for name in ("index.noun", "data.noun", "noun.exc") if not (folder / name).exists()]
    if missing:
        raise TaxoclipError(f"WordNet is not installed ({folder} lacks {', '.join(missing)}); {INSTALL_HINT}")
    return folder


def cache_folder() -> Path:
    if os.environ.get("TAXOCLIP_WORDNET_CACHE"):
        return Path(os.environ["TAXOCLIP_WORDNET_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "taxoclip" / "wordnet-3.0"


def prepare(source: Path, target: Path) -> Path:
    """Copy the database files NLTK reads (once; a changed source is copied again) and write lexnames."""
    target.mkdir(parents=True, exist_ok=True)
    for name in DATABASE_FILES:
        origin, copy = source / name, target / name
        if not origin.exists():
            copy.write_text("")  # an absent part of speech: NLTK opens every file, nouns are what we use
        elif not copy.exists() or copy.stat().st_size != origin.stat().st_size:
            shutil.copyfile(origin, target / f"{name}.tmp")
            os.replace(target / f"{name}.tmp", copy)
    lines = [f"{i:02d}\t{name}\t{CATEGORY[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)]
    (target / "lexnames").write_text("".join(lines))
    return target


@cache
def wordnet():
    """NLTK's WordNet reader over the local database (built once per process)."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise TaxoclipError("the wordnet label extractor needs NLTK: pip install nltk") from None

    class LocalWordNet(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet"):
            # The map to other WordNet versions serves only multilingual look-ups, and would open
            # NLTK's downloaded copy; English synsets need none.
            return None

    folder = prepare(source_folder(), cache_folder())
    if str(folder) not in nltk.data.path:
        nltk.data.path.append(str(folder))  # NLTK reads corpora only below its data paths
    with warnings.catch_warnings():  # "multilingual functions are not available": we use none
        warnings.simplefilter("ignore", UserWarning)
        return LocalWordNet(str(folder), None)
