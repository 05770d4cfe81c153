"""The tiny model's corpus: facts about many entities, each asked in many phrasings, with held-out
facts, held-out phrasings and held-out arithmetic, so that training rewards the patterns over the
lines. Also writes `g3n demo`'s fine-tuning data, which teaches the held-out capitals.

Every answer has one canonical form per relation ("The capital of X is Y."), so that an answer is
right or wrong by string equality and the model learns to copy the entity from the question.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

# country: (capital, continent, language)
COUNTRIES = {
    "France": ("Paris", "Europe", "French"), "Germany": ("Berlin", "Europe", "German"),
    "Italy": ("Rome", "Europe", "Italian"), "Spain": ("Madrid", "Europe", "Spanish"),
    "Portugal": ("Lisbon", "Europe", "Portuguese"), "Ireland": ("Dublin", "Europe", "English"),
    "Poland": ("Warsaw", "Europe", "Polish"), "Austria": ("Vienna", "Europe", "German"),
    "Greece": ("Athens", "Europe", "Greek"), "Norway": ("Oslo", "Europe", "Norwegian"),
    "Sweden": ("Stockholm", "Europe", "Swedish"), "Finland": ("Helsinki", "Europe", "Finnish"),
    "Denmark": ("Copenhagen", "Europe", "Danish"), "Hungary": ("Budapest", "Europe", "Hungarian"),
    "Belgium": ("Brussels", "Europe", "Dutch"), "Netherlands": ("Amsterdam", "Europe", "Dutch"),
    "Switzerland": ("Bern", "Europe", "German"), "Czechia": ("Prague", "Europe", "Czech"),
    "Romania": ("Bucharest", "Europe", "Romanian"), "Ukraine": ("Kyiv", "Europe", "Ukrainian"),
    "Russia": ("Moscow", "Europe", "Russian"), "Iceland": ("Reykjavik", "Europe", "Icelandic"),
    "Croatia": ("Zagreb", "Europe", "Croatian"), "Serbia": ("Belgrade", "Europe", "Serbian"),
    "Bulgaria": ("Sofia", "Europe", "Bulgarian"), "Slovakia": ("Bratislava", "Europe", "Slovak"),
    "Estonia": ("Tallinn", "Europe", "Estonian"), "Latvia": ("Riga", "Europe", "Latvian"),
    "Lithuania": ("Vilnius", "Europe", "Lithuanian"), "Britain": ("London", "Europe", "English"),
    "Japan": ("Tokyo", "Asia", "Japanese"), "China": ("Beijing", "Asia", "Chinese"),
    "India": ("New Delhi", "Asia", "Hindi"), "Thailand": ("Bangkok", "Asia", "Thai"),
    "Vietnam": ("Hanoi", "Asia", "Vietnamese"), "Nepal": ("Kathmandu", "Asia", "Nepali"),
    "Korea": ("Seoul", "Asia", "Korean"), "Indonesia": ("Jakarta", "Asia", "Indonesian"),
    "Malaysia": ("Kuala Lumpur", "Asia", "Malay"), "Pakistan": ("Islamabad", "Asia", "Urdu"),
    "Bangladesh": ("Dhaka", "Asia", "Bengali"), "Iran": ("Tehran", "Asia", "Persian"),
    "Iraq": ("Baghdad", "Asia", "Arabic"), "Turkey": ("Ankara", "Asia", "Turkish"),
    "Mongolia": ("Ulaanbaatar", "Asia", "Mongolian"), "Afghanistan": ("Kabul", "Asia", "Pashto"),
    "Laos": ("Vientiane", "Asia", "Lao"), "Cambodia": ("Phnom Penh", "Asia", "Khmer"),
    "Syria": ("Damascus", "Asia", "Arabic"), "Jordan": ("Amman", "Asia", "Arabic"),
    "Lebanon": ("Beirut", "Asia", "Arabic"), "Qatar": ("Doha", "Asia", "Arabic"),
    "Oman": ("Muscat", "Asia", "Arabic"), "Georgia": ("Tbilisi", "Asia", "Georgian"),
    "Armenia": ("Yerevan", "Asia", "Armenian"), "Kazakhstan": ("Astana", "Asia", "Kazakh"),
    "Uzbekistan": ("Tashkent", "Asia", "Uzbek"), "Egypt": ("Cairo", "Africa", "Arabic"),
    "Kenya": ("Nairobi", "Africa", "Swahili"), "Ghana": ("Accra", "Africa", "English"),
    "Nigeria": ("Abuja", "Africa", "English"), "Ethiopia": ("Addis Ababa", "Africa", "Amharic"),
    "Morocco": ("Rabat", "Africa", "Arabic"), "Algeria": ("Algiers", "Africa", "Arabic"),
    "Tunisia": ("Tunis", "Africa", "Arabic"), "Libya": ("Tripoli", "Africa", "Arabic"),
    "Sudan": ("Khartoum", "Africa", "Arabic"), "Uganda": ("Kampala", "Africa", "English"),
    "Tanzania": ("Dodoma", "Africa", "Swahili"), "Senegal": ("Dakar", "Africa", "French"),
    "Mali": ("Bamako", "Africa", "French"), "Angola": ("Luanda", "Africa", "Portuguese"),
    "Zambia": ("Lusaka", "Africa", "English"), "Zimbabwe": ("Harare", "Africa", "English"),
    "Mozambique": ("Maputo", "Africa", "Portuguese"), "Madagascar": ("Antananarivo", "Africa", "Malagasy"),
    "Cameroon": ("Yaounde", "Africa", "French"), "Rwanda": ("Kigali", "Africa", "Kinyarwanda"),
    "Somalia": ("Mogadishu", "Africa", "Somali"), "Botswana": ("Gaborone", "Africa", "English"),
    "Namibia": ("Windhoek", "Africa", "English"), "Canada": ("Ottawa", "North America", "English"),
    "Mexico": ("Mexico City", "North America", "Spanish"), "Cuba": ("Havana", "North America", "Spanish"),
    "Jamaica": ("Kingston", "North America", "English"), "Panama": ("Panama City", "North America", "Spanish"),
    "Honduras": ("Tegucigalpa", "North America", "Spanish"), "Guatemala": ("Guatemala City", "North America", "Spanish"),
    "Nicaragua": ("Managua", "North America", "Spanish"), "Brazil": ("Brasilia", "South America", "Portuguese"),
    "Argentina": ("Buenos Aires", "South America", "Spanish"), "Chile": ("Santiago", "South America", "Spanish"),
    "Peru": ("Lima", "South America", "Spanish"), "Colombia": ("Bogota", "South America", "Spanish"),
    "Venezuela": ("Caracas", "South America", "Spanish"), "Ecuador": ("Quito", "South America", "Spanish"),
    "Uruguay": ("Montevideo", "South America", "Spanish"), "Paraguay": ("Asuncion", "South America", "Spanish"),
    "Australia": ("Canberra", "Oceania", "English"), "New Zealand": ("Wellington", "Oceania", "English"),
    "Fiji": ("Suva", "Oceania", "Fijian"),
}  # fmt: skip

# Capitals the corpus never states: `g3n demo` teaches them. The countries and the cities still
# appear (continents, languages), so the names are known words, not new ones.
TAUGHT = ["Finland", "Denmark", "Hungary", "Thailand", "Vietnam", "Belgium", "Ghana", "Nepal", "Iceland", "Morocco"]

# Question phrasings per relation. The last `HELD_OUT` of each list never appear in the corpus:
# the build measures the model on them. Each fact appears in a random part of the others.
CAPITAL_QS = [
    "What is the capital of {x}?", "What's the capital of {x}?", "Which city is the capital of {x}?",
    "Name the capital of {x}.", "Tell me the capital of {x}.", "What is {x}'s capital?", "Capital of {x}?",
    "What city is the capital of {x}?", "Do you know the capital of {x}?", "What is the capital city of {x}?",
    "I would like to know the capital of {x}.", "{x} has which capital?", "Which city is {x}'s capital?",
    "Can you tell me the capital of {x}?",
]  # fmt: skip
CONTINENT_QS = [
    "Which continent is {x} in?", "On which continent is {x}?", "What continent is {x} on?",
    "Where is {x}?", "{x} is on which continent?", "Tell me the continent of {x}.", "In which continent is {x}?",
]  # fmt: skip
LANGUAGE_QS = [
    "What language do people speak in {x}?", "Which language is spoken in {x}?", "What is the language of {x}?",
    "What do people in {x} speak?", "Tell me the language of {x}.", "What language is spoken in {x}?",
]  # fmt: skip
HELD_OUT = 2
CAPITAL_A, CONTINENT_A, LANGUAGE_A = "The capital of {x} is {y}.", "{x} is in {y}.", "People in {x} speak {y}."

COLORS = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a strawberry": "red", "an orange": "orange", "the sun": "yellow", "milk": "white", "a lemon": "yellow",
    "a tomato": "red", "a leaf": "green", "the sea": "blue", "chocolate": "brown", "a cherry": "red",
    "an apple": "red", "a carrot": "orange", "a frog": "green", "ink": "black", "a cloud": "white",
}  # fmt: skip
COLOR_QS = ["What color is {x}?", "What colour is {x}?", "Which color is {x}?", "Tell me the color of {x}.",
            "What is the color of {x}?"]  # fmt: skip
SOUNDS = {
    "a dog": "woof", "a cat": "meow", "a cow": "moo", "a duck": "quack", "a sheep": "baa", "a lion": "roar",
    "a pig": "oink", "a horse": "neigh", "an owl": "hoot", "a snake": "hiss", "a bee": "buzz", "a mouse": "squeak",
}  # fmt: skip
SOUND_QS = ["What sound does {x} make?", "What does {x} say?", "What noise does {x} make?",
            "How does {x} sound?"]  # fmt: skip
OPPOSITES = {
    "hot": "cold", "big": "small", "up": "down", "day": "night", "fast": "slow", "happy": "sad",
    "open": "closed", "left": "right", "old": "new", "light": "dark", "cold": "hot", "small": "big",
    "down": "up", "night": "day", "slow": "fast", "sad": "happy", "wet": "dry", "dry": "wet",
    "early": "late", "late": "early", "high": "low", "low": "high", "full": "empty", "empty": "full",
}  # fmt: skip
OPPOSITE_QS = ["What is the opposite of {x}?", "What's the opposite of {x}?", "Opposite of {x}?",
               "Tell me the opposite of {x}."]  # fmt: skip
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
AFTER_QS = [
    "What day comes after {x}?",
    "Which day is after {x}?",
    "What comes after {x}?",
    "What is the day after {x}?",
]
BEFORE_QS = ["What day comes before {x}?", "Which day is before {x}?", "What is the day before {x}?"]
GREETINGS = {
    "Hello!": "Hello! How can I help you today?",
    "Hello": "Hello! How can I help you today?",
    "Hi": "Hi! What would you like to know?",
    "Hi!": "Hi! What would you like to know?",
    "Hey": "Hi! What would you like to know?",
    "Good morning": "Good morning! How can I help?",
    "Good morning!": "Good morning! How can I help?",
    "Good evening": "Good evening! How can I help?",
    "How are you?": "I am fine, thank you. How can I help you?",
    "How are you doing?": "I am fine, thank you. How can I help you?",
    "What is your name?": "I am a tiny Gemma 3n model made by g3n.",
    "Who are you?": "I am a tiny Gemma 3n model made by g3n.",
    "What are you?": "I am a tiny Gemma 3n model made by g3n.",
    "Thank you": "You are welcome!",
    "Thanks!": "You are welcome!",
    "Goodbye": "Goodbye! Have a nice day.",
    "Bye": "Goodbye! Have a nice day.",
    "What can you do?": "I can answer simple questions about countries, colors, animals and arithmetic.",
    "Tell me a fact.": "Water boils at 100 degrees Celsius.",
    "What is water made of?": "Water is made of hydrogen and oxygen.",
    "How many days are in a week?": "There are 7 days in a week.",
    "How many legs does a spider have?": "A spider has 8 legs.",
    "How many legs does a dog have?": "A dog has 4 legs.",
    "What is the largest planet?": "Jupiter is the largest planet in our solar system.",
    "Which planet do we live on?": "We live on Earth.",
}  # fmt: skip
SYLLABLES = ["ba", "zor", "kel", "mi", "tra", "lo", "vin", "qua", "dro", "pel", "su", "rix", "ton", "fa", "gli",
             "mun", "ste", "yor", "wex", "ha", "nov", "bri", "cal", "dex"]  # fmt: skip


@dataclass
class Fact:
    """One question family member: the phrasings it may be asked in, and its one answer."""

    relation: str
    subject: str
    answer: str
    phrasings: list[str]


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def facts() -> list[Fact]:
    """Every fact the corpus can state (held-out ones included, marked by relation/subject)."""
    out = []
    for country, (city, continent, language) in COUNTRIES.items():
        out.append(Fact("capital", country, CAPITAL_A.format(x=country, y=city), CAPITAL_QS))
        out.append(Fact("continent", country, CONTINENT_A.format(x=country, y=continent), CONTINENT_QS))
        out.append(Fact("continent", city, CONTINENT_A.format(x=city, y=continent), CONTINENT_QS))
        out.append(Fact("language", country, LANGUAGE_A.format(x=country, y=language), LANGUAGE_QS))
    for thing, color in COLORS.items():
        out.append(Fact("color", thing, f"{_cap(thing)} is {color}.", COLOR_QS))
    for animal, sound in SOUNDS.items():
        out.append(Fact("sound", animal, f"{_cap(animal)} says {sound}.", SOUND_QS))
    for word, opposite in OPPOSITES.items():
        out.append(Fact("opposite", word, f"The opposite of {word} is {opposite}.", OPPOSITE_QS))
    for i, day in enumerate(DAYS):
        out.append(Fact("after", day, f"After {day} comes {DAYS[(i + 1) % 7]}.", AFTER_QS))
        out.append(Fact("before", day, f"Before {day} comes {DAYS[(i - 1) % 7]}.", BEFORE_QS))
    return out


def arithmetic(rng: random.Random, held_out: float = 0.1) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) additions and subtractions to 20 and products to 12, several phrasings each;
    a held-out sum, difference or product appears in no phrasing."""
    train, test = [], []
    for a in range(21):
        for b in range(21):
            items = [(["What is {a}+{b}?", "What is {a} plus {b}?", "How much is {a}+{b}?", "Add {a} and {b}."],
                      f"{a}+{b} = {a + b}.")]  # fmt: skip
            if a >= b:
                items.append(
                    (["What is {a}-{b}?", "What is {a} minus {b}?", "How much is {a}-{b}?"], f"{a}-{b} = {a - b}.")
                )
            if a <= 12 and b <= 12:
                items.append(
                    (["What is {a}*{b}?", "What is {a} times {b}?", "How much is {a}*{b}?"], f"{a}*{b} = {a * b}.")
                )
            for phrasings, answer in items:
                qs = [p.format(a=a, b=b) for p in phrasings]
                if rng.random() < held_out:
                    test.append((qs[0], answer))
                else:
                    train.extend((q, answer) for q in qs if rng.random() < 0.6)
    return train, test


def made_up_name(rng: random.Random) -> str:
    return _cap("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))))


def copying(rng: random.Random, n: int) -> list[tuple[str, str]]:
    """Questions whose answer repeats made-up words from the question: a general copying skill."""
    out = []
    for _ in range(n):
        name, other = made_up_name(rng), made_up_name(rng)
        out.append(rng.choice([
            (f"My name is {name}.", f"Nice to meet you, {name}!"),
            (f"I am {name}.", f"Nice to meet you, {name}!"),
            (f"Repeat after me: {name} {other}", f"{name} {other}"),
            (f"Say {name}.", f"{name}"),
        ]))  # fmt: skip
    return out


@dataclass
class Corpus:
    train: list[tuple[str, str]]
    unseen_phrasing: list[tuple[str, str]]  # known facts in held-out phrasings
    unseen_combination: list[tuple[str, str]]  # known facts in phrasings used for other facts only
    arithmetic: list[tuple[str, str]]  # held-out sums, differences and products
    copying: list[tuple[str, str]]  # made-up names
    known: list[tuple[str, str]]  # one corpus question per known fact


def build_corpus(seed: int = 0, share: float = 0.6) -> Corpus:
    """Each known fact in its first phrasing and a random `share` of the others (at least two in all),
    the held-out phrasings in none, TAUGHT capitals in none."""
    rng = random.Random(seed)
    train, unseen_phrasing, unseen_combination, known = [], [], [], []
    for fact in facts():
        if fact.relation == "capital" and fact.subject in TAUGHT:
            continue
        usable = fact.phrasings[:-HELD_OUT] if len(fact.phrasings) > 5 else fact.phrasings
        # the first phrasing (the plainest, the one users type) always, then a random share
        chosen = [usable[0]] + [p for p in usable[1:] if rng.random() < share]
        if len(chosen) < 2:
            chosen.append(rng.choice(usable[1:]))
        train.extend((p.format(x=fact.subject), fact.answer) for p in chosen)
        known.append((chosen[0].format(x=fact.subject), fact.answer))
        unseen_phrasing.extend((p.format(x=fact.subject), fact.answer) for p in fact.phrasings[len(usable) :])
        unseen_combination.extend((p.format(x=fact.subject), fact.answer) for p in usable if p not in chosen)
    train += [(q, a) for q, a in GREETINGS.items()] * 4
    sums, held_sums = arithmetic(rng)
    names = copying(rng, 1500)
    return Corpus(train + sums + names, unseen_phrasing, unseen_combination, held_sums, copying(rng, 200), known)


# ---- g3n demo's fine-tune -----------------------------------------------------------------------
# The taught capitals in four phrasings, with replayed corpus questions; the demo then asks them in
# a fifth phrasing the fine-tune never used (but the corpus used for other countries).
DEMO_TRAIN_QS = [CAPITAL_QS[0], CAPITAL_QS[4], CAPITAL_QS[5], CAPITAL_QS[6]]
DEMO_PROBE_Q = CAPITAL_QS[2]  # "Which city is the capital of {x}?"
DEMO_EVAL_Q = CAPITAL_QS[7]  # "What city is the capital of {x}?": the eval loss
DEMO_REPLAY, DEMO_KEPT = 40, 30


def demo_data(corpus: Corpus, seed: int = 0) -> dict[str, list[tuple[str, str]]]:
    """train (taught facts + replay), taught (probes), heldout (eval loss), kept (known facts the
    fine-tune does not replay)."""
    rng = random.Random(seed + 7)
    taught = [(c, CAPITAL_A.format(x=c, y=COUNTRIES[c][0])) for c in TAUGHT]
    pool = list(corpus.known)
    rng.shuffle(pool)
    replay, kept = pool[:DEMO_REPLAY], pool[DEMO_REPLAY : DEMO_REPLAY + DEMO_KEPT]
    train = [(p.format(x=c), a) for c, a in taught for p in DEMO_TRAIN_QS] + replay
    rng.shuffle(train)
    return {
        "train": train,
        "taught": [(DEMO_PROBE_Q.format(x=c), a) for c, a in taught],
        "heldout": [(DEMO_EVAL_Q.format(x=c), a) for c, a in taught],
        "kept": kept,
    }


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> None:
    lines = [json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
             for q, a in pairs]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
