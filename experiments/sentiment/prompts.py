"""The experiment's prompts: topics x request templates, written for this experiment.

Training and held-out prompts never share a topic, and the held-out set also uses two templates that training
never sees, so the evaluation measures how a method generalises rather than what it memorised.

>>> train, held_out = train_prompts(), held_out_prompts()
>>> len(train) >= 300, len(held_out) >= 100
(True, True)
>>> not {p for p in train} & {p for p in held_out}
True
>>> dev = unseen_dev_prompts()
>>> len(dev), not set(dev) & (set(train) | set(held_out))
(60, True)
"""

from __future__ import annotations

import random

__all__ = ["DEV_TOPICS", "HELD_OUT_TOPICS", "TRAIN_TOPICS", "as_messages", "held_out_prompts", "train_prompts",
           "unseen_dev_prompts"]

# Everyday topics people voice opinions on; neutral wording, so the sentiment is up to the answer.
TRAIN_TOPICS = [
    "rainy mornings", "public libraries", "electric scooters", "open-plan offices", "reality television",
    "homemade bread", "long train journeys", "video calls", "city parks", "fast food", "jazz music",
    "self-checkout machines", "camping trips", "smartwatches", "morning jogging", "board games", "winter holidays",
    "online shopping", "street art", "houseplants", "crowded beaches", "audiobooks", "working from home",
    "spicy food", "superhero movies", "learning a new language", "museum visits", "social media", "cold showers",
    "vinyl records", "group projects", "road trips", "tea", "coffee shops", "horror films", "gardening",
    "airport security", "podcasts", "cooking at home", "team sports", "rush-hour traffic", "old bookstores",
    "mobile games", "farmers markets", "theme parks", "poetry", "early alarms", "cycling to work",
    "classical music", "online meetings", "second-hand clothes", "karaoke nights", "snowy weather", "cruise ships",
    "chess", "science fiction novels", "hiking", "open-air concerts", "instant noodles", "robot vacuum cleaners",
    "wedding speeches", "small towns", "standing desks", "cartoons for adults", "summer heat", "thrift stores",
    "public speaking", "birdwatching", "dentist appointments", "food trucks", "documentary films", "yoga classes",
    "news podcasts", "long meetings", "handwritten letters", "pop music", "ice cream", "night shifts",
    "zoos", "escape rooms", "tiny houses",
]
HELD_OUT_TOPICS = [
    "sailing", "opera", "pickled vegetables", "night markets", "e-readers", "marathon running", "ceramics classes",
    "ferry rides", "stand-up comedy", "mountain cabins", "fountain pens", "jigsaw puzzles", "botanical gardens",
    "drive-in cinemas", "sourdough pizza", "bird feeders", "quiz nights", "hot air balloons", "city trams",
    "folk music", "paper maps", "knitting", "lighthouses", "roller skating", "picnics",
]
# Development topics: neither trained on nor held out. With two training templates and two templates of their own
# they shift away from training the way the held-out prompts do, so the KL they show is the KL to expect on
# prompts the policies never saw.
DEV_TOPICS = [
    "tennis", "street food tours", "wind farms", "comic books", "pottery", "late-night radio", "bus journeys",
    "indoor climbing", "crossword puzzles", "aquariums", "flea markets", "school reunions", "spa days",
    "musicals", "rooftop bars",
]

TRAIN_TEMPLATES = [
    "What do you think about {topic}? Answer in one or two sentences.",
    "Write a short review of {topic}.",
    "Give me your honest opinion of {topic} in a few words.",
    "Describe your feelings about {topic} briefly.",
    "In two sentences, tell me what you make of {topic}.",
]
HELD_OUT_TEMPLATES = [
    "What do you think about {topic}? Answer in one or two sentences.",
    "Write a short review of {topic}.",
    "Share a quick comment on {topic}.",
    "How would you sum up {topic} for a friend, in one sentence?",
]
DEV_TEMPLATES = [
    "What do you think about {topic}? Answer in one or two sentences.",
    "Write a short review of {topic}.",
    "What is your take on {topic}? Keep it brief.",
    "Tell a friend in a sentence or two how you feel about {topic}.",
]


def _fill(topics: list[str], templates: list[str], n: int, seed: int) -> list[str]:
    prompts = [t.format(topic=topic) for topic in topics for t in templates]
    random.Random(seed).shuffle(prompts)
    return prompts[:n]


def train_prompts(n: int = 400, seed: int = 0) -> list[str]:
    """Up to ``n`` training prompts (81 topics x 5 templates = 405 in all), in a seeded order."""
    return _fill(TRAIN_TOPICS, TRAIN_TEMPLATES, n, seed)


def held_out_prompts(n: int = 100, seed: int = 0) -> list[str]:
    """Up to ``n`` held-out prompts (25 topics x 4 templates = 100), topics disjoint from training."""
    return _fill(HELD_OUT_TOPICS, HELD_OUT_TEMPLATES, n, seed)


def unseen_dev_prompts(n: int = 60, seed: int = 0) -> list[str]:
    """Up to ``n`` development prompts on unseen topics (15 topics x 4 templates = 60), disjoint from both sets."""
    return _fill(DEV_TOPICS, DEV_TEMPLATES, n, seed)


def as_messages(prompt: str) -> list[dict[str, str]]:
    """A prompt as the one-turn chat the instruct model expects."""
    return [{"role": "user", "content": prompt}]
