"""Voice-assistant sentences over a real English vocabulary, for the synthetic corpus.

A small template grammar: each template is a string whose ``{slot}`` fields are filled from word
lists, numbers written as words. Transcripts are normalised with :func:`normalize_transcript`
(lowercase a-z, apostrophe, single spaces), so what the synthesiser reads is exactly what a model
is asked to transcribe. Most sentences have 3 to 8 words.
"""

from __future__ import annotations

import random
import re

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()  # fmt: skip
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """Write 0 <= n < 1000 as English words (``125`` -> ``one hundred twenty five``)."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words handles 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + ("" if ones == 0 else " " + _ONES[ones])
    hundreds, rest = divmod(n, 100)
    return _ONES[hundreds] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


_SLOTS: dict[str, tuple[str, ...]] = {
    "room": ("kitchen", "living room", "bedroom", "bathroom", "hallway", "garage", "office",
             "dining room", "basement", "garden", "kids room", "guest room"),
    "device": ("lights", "lamp", "fan", "heater", "television", "radio", "coffee machine", "dishwasher",
               "washing machine", "air conditioner", "speaker", "oven", "porch light"),
    "on_off": ("on", "off"),
    "up_down": ("up", "down"),
    "city": ("paris", "london", "tokyo", "berlin", "chicago", "boston", "seattle", "madrid", "rome",
             "sydney", "toronto", "dublin", "denver", "miami", "new york", "san francisco",
             "amsterdam", "vienna", "lisbon", "cairo", "mumbai", "seoul", "mexico city", "oslo"),
    "when": ("today", "tomorrow", "tonight", "this morning", "this afternoon", "this evening",
             "this weekend", "next week", "on monday", "on tuesday", "on wednesday", "on thursday",
             "on friday", "on saturday", "on sunday", "tomorrow morning", "later today"),
    "contact": ("mom", "dad", "grandma", "grandpa", "sarah", "david", "emily", "michael", "anna",
                "james", "olivia", "lucas", "sophie", "daniel", "my sister", "my brother",
                "the office", "the doctor", "my boss", "uncle tom", "aunt mary", "the dentist"),
    "genre": ("jazz", "rock", "classical music", "pop", "country", "hip hop", "blues", "reggae",
              "folk music", "relaxing music", "the radio", "something upbeat", "my favorites",
              "the beatles", "piano music", "old songs"),
    "item": ("milk", "eggs", "bread", "butter", "apples", "bananas", "coffee", "tea", "rice",
             "pasta", "cheese", "chicken", "tomatoes", "potatoes", "onions", "orange juice",
             "paper towels", "dish soap", "toothpaste", "batteries", "dog food", "yogurt", "flour"),
    "task": ("take out the trash", "water the plants", "call the bank", "pick up the kids",
             "buy a birthday present", "pay the rent", "feed the cat", "walk the dog",
             "go to the gym", "book a table", "send the report", "charge my phone",
             "take my medicine", "check the mail", "clean the kitchen", "return the books"),
    "place": ("the airport", "the station", "work", "home", "the hospital", "the library",
              "the park", "the beach", "the city center", "the mall", "school", "the museum"),
    "nearby": ("gas station", "pharmacy", "coffee shop", "supermarket", "bakery", "bank",
               "post office", "parking lot", "hotel", "restaurant"),
    "cuisine": ("italian", "chinese", "mexican", "thai", "indian", "japanese", "greek", "french",
                "korean", "vegetarian"),
    "message": ("i'm running late", "i'll be home soon", "see you tonight", "call me back",
                "dinner is ready", "i'm on my way", "happy birthday", "thank you so much",
                "don't forget the keys", "the meeting is over"),
    "unit": ("minutes", "seconds", "hours"),
    "hour": tuple(number_words(h) for h in range(1, 13)),
    "ampm": ("in the morning", "in the evening", "tonight", "o'clock"),
    "small": tuple(number_words(n) for n in range(2, 21)),
    "number": tuple(number_words(n) for n in (*range(1, 31), 40, 45, 50, 60, 75, 90, 100, 120, 250)),
    "percent": tuple(number_words(n) for n in (10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100)),
    "degrees": tuple(number_words(n) for n in range(16, 27)),
    "weekday": ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"),
    "show": ("the news", "the game", "a movie", "the next episode", "my podcast", "cartoons",
             "the cooking show", "a documentary"),
    "question_thing": ("the weather", "the traffic", "the news", "my schedule", "the score"),
    "fact": ("the capital of france", "the tallest mountain", "the speed of light",
             "the population of canada", "the longest river", "the biggest ocean"),
    "word": ("necessary", "rhythm", "beautiful", "restaurant", "tomorrow", "library", "february",
             "calendar", "separate", "definitely"),
    "appliance_action": ("start", "stop", "pause"),
    "door": ("front door", "back door", "garage door", "side gate", "window"),
    "volume": ("louder", "quieter", "a bit louder", "a little quieter"),
}

_TEMPLATES: tuple[str, ...] = (
    # timers and alarms
    "set a timer for {small} {unit}", "set a {small} minute timer",
    "set an alarm for {hour} {ampm}", "wake me up at {hour} {ampm}",
    "cancel my alarm for {when}", "how much time is left on the timer", "stop the timer",
    "snooze the alarm for {small} minutes", "set an alarm every {weekday} at {hour}",
    # home control
    "turn {on_off} the {room} {device}", "turn {on_off} the {device}",
    "turn {on_off} the {device} in the {room}", "dim the lights in the {room}",
    "set the {room} lights to {percent} percent", "set the thermostat to {degrees} degrees",
    "make it warmer in the {room}", "is the {door} locked", "lock the {door}",
    "open the {door}", "{appliance_action} the {device}", "are the {room} lights on",
    # weather
    "what is the weather in {city} {when}", "what's the weather like {when}",
    "will it rain {when}", "will it rain in {city} {when}", "do i need an umbrella {when}",
    "how cold is it in {city}", "what's the temperature outside", "is it going to snow {when}",
    "how windy is it {when}",
    # calls and messages
    "call {contact}", "call {contact} on speaker", "call {contact} at work",
    "send a message to {contact}", "text {contact} {message}", "tell {contact} {message}",
    "read my messages from {contact}", "did {contact} call me", "video call {contact}",
    # music and media
    "play some {genre}", "play some {genre} in the {room}", "play {genre} in the {room}",
    "turn the volume {up_down}", "make it {volume}", "skip this song", "pause the music",
    "play the next song", "what song is this", "put on {show}", "play {show} on the television",
    "turn the music {up_down} in the {room}", "shuffle my playlist", "resume {show}",
    # lists and shopping
    "add {item} to my shopping list", "add {item} and {item} to the list",
    "remove {item} from my shopping list", "what's on my shopping list", "order more {item}",
    "do we need {item}", "put {item} on the list",
    # calendar and reminders
    "remind me to {task} {when}", "remind me to {task} at {hour} {ampm}",
    "what's on my calendar {when}", "what do i have {when}",
    "schedule a meeting with {contact} {when}", "when is my next appointment",
    "cancel my meeting {when}", "move my meeting to {weekday}",
    # questions
    "what time is it in {city}", "how far is {city} from {city}", "how do you spell {word}",
    "what is {number} plus {number}", "what is {number} times {small}",
    "convert {number} miles to kilometers", "what is {fact}", "tell me about {fact}",
    "tell me a joke", "what's the news {when}", "how is {question_thing} {when}",
    "who won the game last night", "what day is it {when}",
    # navigation and places
    "how long will it take to get to {place}", "navigate to {place}",
    "find the nearest {nearby}", "is there a {nearby} near me", "find some {cuisine} food near me",
    "book a table for {small} at {hour} {ampm}", "how is the traffic to {place}",
    "when does the {nearby} close", "get me a taxi to {place}",
)

_SLOT = re.compile(r"\{(\w+)\}")
_NOT_ALLOWED = re.compile(r"[^a-z' ]+")


def normalize_transcript(text: str) -> str:
    """Lowercase, map anything but a-z and apostrophe to a space, collapse runs of spaces."""
    return " ".join(_NOT_ALLOWED.sub(" ", text.lower()).split())


def _fill(template: str, rng: random.Random) -> str:
    return normalize_transcript(_SLOT.sub(lambda m: rng.choice(_SLOTS[m.group(1)]), template))


def vocabulary() -> frozenset[str]:
    """Every word any generated sentence can contain."""
    words = {w for t in _TEMPLATES for w in normalize_transcript(_SLOT.sub(" ", t)).split()}
    words.update(w for values in _SLOTS.values() for v in values for w in normalize_transcript(v).split())
    return frozenset(words)


def generate_sentences(n: int, rng: random.Random) -> list[str]:
    """``n`` normalised sentences drawn from ``rng`` (distinct within one call while possible)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[str] = []
    seen: set[str] = set()
    attempts = 0
    while len(out) < n:
        sentence = _fill(rng.choice(_TEMPLATES), rng)
        attempts += 1
        if sentence in seen and attempts < 20 * n:
            continue
        seen.add(sentence)
        out.append(sentence)
    return out
