"""A small English stop-word list for the text pipeline (``data_prep.text``).

Written for this project (no NLTK download needed). It holds function words:
articles, pronouns, auxiliaries, common prepositions and conjunctions, their
contracted forms, and the bare fragments a contraction leaves when its
apostrophe is lost (``it s`` -> ``s``). Negations (``no``, ``not``, ``never``,
``nor`` and the ``n't`` forms) are deliberately *not* stop words: they flip
the polarity of a sentence, which is what the sentiment/aggression tasks are
about.

All entries are lower case and use the ASCII apostrophe, the form
:func:`data_prep.text.tokenize` produces.
"""

_ARTICLES_DETERMINERS = """
a an the this that these those each every either neither some any all both
such what which whose whatever whichever another other others own same
"""

_PRONOUNS = """
i me my mine myself we us our ours ourselves you your yours yourself
yourselves he him his himself she her hers herself it its itself they them
their theirs themselves who whom one
"""

_AUXILIARIES = """
am is are was were be been being have has had having do does did doing
will would shall should can could may might must
"""

_PREPOSITIONS = """
about above across after against along among around as at before behind
below beneath beside between beyond by down during except for from in inside
into near of off on onto out outside over per since through throughout till
to toward towards under until up upon via with within without
"""

_CONJUNCTIONS_ADVERBS = """
and but or so if then than because while whereas although though unless
whether yet also just only very too quite rather again further once here
there when where why how now ever still even else
more most less least much many few several
"""

_CONTRACTIONS = """
i'm i've i'll i'd you're you've you'll you'd he's he'll he'd she's she'll
she'd it's it'll we're we've we'll we'd they're they've they'll they'd
that's that'll there's here's what's who's where's when's why's how's let's
s t d m ll re ve
"""

STOP_WORDS: frozenset[str] = frozenset(
    (
        _ARTICLES_DETERMINERS
        + _PRONOUNS
        + _AUXILIARIES
        + _PREPOSITIONS
        + _CONJUNCTIONS_ADVERBS
        + _CONTRACTIONS
    ).split()
)
"""The stop words removed by the text pipeline (lower case)."""

NEGATIONS: frozenset[str] = frozenset(
    """no not nor never none nobody nothing nowhere
    don't doesn't didn't isn't aren't wasn't weren't haven't hasn't hadn't
    won't wouldn't can't cannot couldn't shouldn't mustn't mightn't needn't
    shan't ain't""".split()
)
"""Negation words, kept on purpose (never in :data:`STOP_WORDS`)."""
