"""Fixed inputs for the eval metric tests, and the reference implementation's numbers on them.

``REFERENCE_SCORES`` / ``REFERENCE_PER_ITEM`` were computed once with pycocoevalcap 1.2's own pipeline
(Stanford PTBTokenizer in Java, then ``Bleu(4)``, ``Cider()``, ``Rouge()``, ``Meteor()`` — exactly what
``COCOEvalCap.evaluate`` runs), on OpenJDK 17 — see ``reference_caption_scores`` below, which
tests/eval/test_eval_metrics.py also runs live when ``java`` is present:

    python -c "from helpers.eval_fixtures import *; print(reference_caption_scores())"   # from tests/
"""

from __future__ import annotations

# Five images, 2-5 human-style references each (case, punctuation, clitics, brackets, numbers), and one
# generated caption each.
REFERENCES = {
    "1": [
        "A man riding a wave on top of a surfboard.",
        "A surfer rides a large wave in the ocean.",
        "Man on a surfboard riding a big wave!",
        "a person surfing on a wave (in the sea)",
    ],
    "2": [
        "Two dogs aren't playing; they're sleeping on the couch.",
        "Two brown dogs sleep on a gray couch.",
        "A pair of dogs lying on a sofa, asleep.",
    ],
    "3": [
        "A kitchen with a stove, a sink, and a refrigerator.",
        "The kitchen has white cabinets and a black stove.",
        "An empty kitchen with appliances -- stove, fridge & sink.",
        "A clean kitchen in a 1,000-square-foot apartment.",
        "Kitchen with wooden floors and a window over the sink.",
    ],
    "4": [
        "A red double-decker bus driving down the street.",
        "The bus is red and it's on a city street in the U.S.",
    ],
    "5": [
        "A woman holding an umbrella in the rain.",
        "Woman with a black umbrella walks on a wet sidewalk.",
        "A lady's umbrella protects her from the rain at 3:30 p.m.",
    ],
}
ANSWERS = {
    "1": "A man is riding a wave on a surfboard.",
    "2": "Two dogs are sleeping on a couch.",
    "3": "A kitchen with a stove and a sink.",
    "4": "A red bus is driving down a city street.",
    "5": "A cat sitting on a wooden table.",
}

# pycocoevalcap 1.2 + stanford-corenlp-3.4.1 (Java PTBTokenizer) + METEOR 1.5, OpenJDK 17.0.15.
REFERENCE_SCORES = {
    "bleu_1": 0.8499999999575001,
    "bleu_2": 0.7309485031316348,
    "bleu_3": 0.5222928711492364,
    "bleu_4": 0.3616020509845886,
    "cider_d": 1.6641975651994223,
    "rouge_l": 0.6710458722027957,
    "meteor": 0.28988940617633074,
}
# id → (CIDEr-D, BLEU-4, ROUGE-L) per item.
REFERENCE_PER_ITEM = {
    "1": (2.21992362009091, 0.4671379776125745, 0.8341880341880341),
    "2": (1.491823684715016, 6.586847631137227e-05, 0.7030349596619284),
    "3": (2.343845276671578, 0.6434588840586895, 0.7624999999999998),
    "4": (2.2599895086946145, 6.030725359585126e-05, 0.7134502923976607),
    "5": (0.0054057358249943194, 6.701444468735928e-09, 0.34205607476635513),
}


# (caption, what pycocoevalcap's Java PTBTokenizer + punctuation removal makes of it), same setup.
TOKENIZER_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    (
        "Two dogs aren't playing; they're sleeping (on the couch)!",
        "two dogs are n't playing they 're sleeping -lrb- on the couch -rrb-",
    ),
    ("The colour of the man's shirt is grey, isn't it?", "the colour of the man 's shirt is grey is n't it"),
    (
        "A black-and-white photo of a 1,000-year-old tree in the U.S. -- wow...",
        "a black-and-white photo of a 1,000-year-old tree in the u.s. wow",
    ),
    (
        'She said "hello" to the kids\' teacher & left at 3:30 p.m.',
        "she said hello to the kids teacher & left at 3:30 p.m.",
    ),
    (
        "A cat/dog hybrid costs $5.50 or 20% off, e.g. cheap",
        "a cat/dog hybrid costs $ 5.50 or 20 % off e.g. cheap",
    ),
    ("It's a 3.5 inch screen and can't fit, I'd say", "it 's a 3.5 inch screen and ca n't fit i 'd say"),
    (
        "A centre of the theatre; the organisation's favourite programme",
        "a centre of the theatre the organisation 's favourite programme",
    ),
    ("cannot gonna wanna 'tis o'clock", "can not gon na wan na 't is o'clock"),
    ("red:blue, red-blue. 'quoted' `back`", "red blue red-blue quoted back"),
    (
        "Look at this... and this?! [bracket] {brace}",
        "look at this and this ?! -lsb- bracket -rsb- -lcb- brace -rcb-",
    ),
    ("A man's hat; the men's room. James' car", "a man 's hat the men 's room james car"),
    (
        "URL www.example.com and email a@b.com #hashtag *star*",
        "url www.example.com and email a@b.com #hashtag * star *",
    ),
    ("An image shows: 1) a dog; 2) a cat.", "an image shows 1 -rrb- a dog 2 -rrb- a cat"),
    ("There's a red circle at the top left.", "there 's a red circle at the top left"),
    (
        "A group of people standing around a table with food.",
        "a group of people standing around a table with food",
    ),
    (
        "The image shows a red circle in the top left corner. There is one shape on a plain white background.",  # noqa: E501
        "the image shows a red circle in the top left corner there is one shape on a plain white background",
    ),
    (
        "a kitchen with a stove, a sink, and a refrigerator",
        "a kitchen with a stove a sink and a refrigerator",
    ),
    ("A woman is holding an umbrella in the rain.", "a woman is holding an umbrella in the rain"),
    ("Mr. Smith and Dr. Jones went to St. Louis.", "mr. smith and dr. jones went to st. louis"),
    ("I'm sure we'll see you've done it; we'd go.", "i 'm sure we 'll see you 've done it we 'd go"),
    ("He won't stop. They didn't. Wasn't it?", "he wo n't stop they did n't was n't it"),
    ("A bus!! Is that a bus??", "a bus !! is that a bus ??"),
    ("Yes, there is a dog in the image.", "yes there is a dog in the image"),
    ("No, there is no snowboard in the image.", "no there is no snowboard in the image"),
    ("\"Quoted sentence.\" and 'single quoted.'", "quoted sentence and single quoted"),
    (
        "A 10-year-old boy, aged 10, eats 2.5 apples at 12:00.",
        "a 10-year-old boy aged 10 eats 2.5 apples at 12:00",
    ),
    (
        "The scene includes: trees, grass, and a sky - very blue.",
        "the scene includes trees grass and a sky very blue",
    ),
    ("A person on skis -- going down a hill.", "a person on skis going down a hill"),
    ("Cars parked along the street, etc.", "cars parked along the street etc."),
    ("A man holds a sign that reads 'STOP'.", "a man holds a sign that reads stop"),
    ("Fruit (apples, oranges) in a bowl.", "fruit -lrb- apples oranges -rrb- in a bowl"),
    ("A plate with a sandwich & fries on it", "a plate with a sandwich & fries on it"),
    ("Rock'n'roll band plays on stage", "rock 'n' roll band plays on stage"),
    ("The dog’s bone is on the floor.", "the dog 's bone is on the floor"),
    ("an elephant standing next to a tree.   ", "an elephant standing next to a tree"),
    ('A "smart" phone.', "a smart phone"),
    ("“Curly quotes” and ‘single curly’ quotes.", "curly quotes and single curly quotes"),
    ("A sign says 'open.'", "a sign says open"),
    ("The man's.", "the man 's"),
    ("A dog's', and a cat's'.", "a dog 's and a cat 's"),
    ("'em all", "'em all"),
    ("What's that? It's a dog's toy.", "what 's that it 's a dog 's toy"),
    ('The word "yes." ends here', "the word yes ends here"),
    ('He said: "No."', "he said no"),
    ("Mixed CASE Words AND Numbers 123.", "mixed case words and numbers 123"),
    ("A 3-D image of a T-shirt.", "a 3-d image of a t-shirt"),
    (
        "two people, one dog and three cats on a 2nd floor balcony",
        "two people one dog and three cats on a 2nd floor balcony",
    ),
    ("a person wearing a hat , a shirt and jeans .", "a person wearing a hat a shirt and jeans"),
    ("A close up of a plate of food with broccoli", "a close up of a plate of food with broccoli"),
    ("  Multiple   spaces and   gaps  ", "multiple spaces and gaps"),
]


def reference_caption_scores(
    meteor: bool = True,
) -> tuple[dict[str, float], dict[str, tuple[float, float, float]]]:
    """The reference pipeline on REFERENCES/ANSWERS (needs pycocoevalcap and ``java``).

    METEOR's JVM loads a 60 MB paraphrase table (~40 s on a busy 2-core machine): ``meteor=False``
    skips it.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in refs] for k, refs in REFERENCES.items()})
    res = tokenizer.tokenize({k: [{"caption": ANSWERS[k]}] for k in REFERENCES})
    bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
    cider, cider_items = Cider().compute_score(gts, res)
    rouge, rouge_items = Rouge().compute_score(gts, res)
    corpus = {f"bleu_{k + 1}": float(bleu[k]) for k in range(4)}
    corpus.update(cider_d=float(cider), rouge_l=float(rouge))
    if meteor:
        meteor_scorer = Meteor()
        corpus["meteor"] = float(meteor_scorer.compute_score(gts, res)[0])
        meteor_scorer.meteor_p.kill()
        meteor_scorer.meteor_p.wait()
    per_item = {
        key: (float(cider_items[n]), float(bleu_items[3][n]), float(rouge_items[n]))
        for n, key in enumerate(gts)
    }
    return corpus, per_item
