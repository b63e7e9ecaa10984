"""A suffix index over token sequences: the longest suffix of a history that the corpus holds,
and the most frequent way the corpus goes on from there (SuffixDecoding's idea, on a trie of
every corpus suffix cut to a fixed depth). Pure Python: built in seconds for tens of thousands of
captions, looked up in microseconds."""

from __future__ import annotations

START = -1  # marks where a sequence begins, so a history of one token matches sequence starts


class SuffixIndex:
    """Every suffix of every added sequence, up to `depth` tokens, in a trie whose nodes count
    how often the corpus passes through them.

    A node is `[count, children]`, children a dict token -> node. The root's children are every
    token of the corpus (and `START`)."""

    def __init__(self, depth: int = 12):
        if depth < 2:
            raise ValueError(f"a suffix index needs a depth of at least 2 (got {depth})")
        self.depth = depth
        self.root: list = [0, {}]
        self.sequences = 0
        self.tokens = 0

    def add(self, sequence) -> None:
        tokens = [START, *map(int, sequence)]
        self.sequences += 1
        self.tokens += len(tokens) - 1
        for start in range(len(tokens)):
            node = self.root
            node[0] += 1
            for token in tokens[start:start + self.depth]:
                child = node[1].get(token)
                if child is None:
                    child = node[1][token] = [0, {}]
                child[0] += 1
                node = child

    def longest_match(self, history, max_match: int | None = None) -> tuple[int, list | None]:
        """(m, node): the longest suffix of `START + history` (at most `max_match` tokens, and
        less than the depth so a continuation can follow) found in the corpus, and its node.
        (0, None) when not even the last token occurs."""
        tokens = [START, *history]
        longest = min(len(tokens), self.depth - 1, max_match or self.depth)
        for m in range(longest, 0, -1):
            node = self.root
            for token in tokens[-m:]:
                node = node[1].get(token)
                if node is None:
                    break
            else:
                return m, node
        return 0, None

    def continuation(self, history, count: int, stop_below: float = 0.0,
                     max_match: int | None = None) -> tuple[list[int], list[float]]:
        """Up to `count` tokens that most often follow the longest match of `history`, each
        with its share of the corpus's continuations at that point (its empirical probability);
        stops where that share falls below `stop_below`, or where the corpus has nothing more.
        Past the stored depth the match is sought again on the history and the tokens so far."""
        drafts, shares = [], []
        node = None
        while len(drafts) < count:
            if node is None or not node[1]:
                matched, node = self.longest_match([*history, *drafts], max_match)
                if node is None or not node[1]:
                    break
            # most frequent child; ties go to the smaller token id, so drafts are reproducible
            token, child = max(node[1].items(), key=lambda item: (item[1][0], -item[0]))
            share = child[0] / sum(c[0] for c in node[1].values())
            if share < stop_below or token == START:
                break
            drafts.append(token)
            shares.append(share)
            node = child
        return drafts, shares
