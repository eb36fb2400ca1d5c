"""The KV pages of one DP group: the pool, who holds each page, and the prefix cache.

Every page has a reference count: the number of running requests whose page table lists
it. A page is in exactly one of three states:

* **held**: one or more running requests use it (count > 0);
* **cached**: nobody holds it, but it is a whole page whose K/V is known by its content;
  it waits in least-recently-used order and is handed out again only when the pool has
  no clean page left (an *eviction*), or held again by a request with the same prefix;
* **free**: clean, nobody holds it.

Page 0 is the trash page that padding writes to: never handed out.

**Why hash-chained whole pages (as vLLM's automatic prefix caching) and not a radix tree
over tokens (as SGLang's).** Pages are the unit the workers address, and only a whole,
completely written page can be shared: a partly filled last page would be written by the
request that owns it, under the readers. A radix tree earns its keep by matching prefixes
token by token, which would buy nothing here but more code. With a chain hash per page
(page i's hash covers every token up to the end of page i, see
``dpbus.schemas.internal.page_hashes``) the index is one dict, a lookup walks a request's page
hashes until the first miss, and the same hashes, sent in the load report, tell the
router which group holds a prompt's prefix.

Rules that keep shared pages safe:

* a page enters the index only once every one of its positions is written
  (``publish``), and a request writes only positions at or past its ``prefilled`` count,
  which lie in pages it alone holds; so an indexed page is never written again until it
  is evicted, and eviction only takes pages nobody holds;
* ``release`` drops references, never pages: a page someone else holds stays theirs;
* a release that would take a count below zero raises (a double free is a bug, not a
  no-op).
"""

from __future__ import annotations

from collections import OrderedDict


class PagePool:
    def __init__(self, num_pages: int, page_size: int, cache: bool = True) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.cache = cache
        self.refs = [0] * num_pages
        self._free: list[int] = list(range(num_pages - 1, 0, -1))  # taken from the end: 1, 2, 3...
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached pages nobody holds, oldest first
        self._hash_of: dict[int, bytes] = {}  # page -> chain hash, for every cached page (held or idle)
        self._page_of: dict[bytes, int] = {}
        self.evictions = 0

    # ---- what the pool has -------------------------------------------------------------
    def available(self) -> int:
        """Pages ``take`` can hand out now: free ones, then cached ones nobody holds."""
        return len(self._free) + len(self._idle)

    def unheld(self) -> list[int]:
        """Every page nobody holds (free or cached)."""
        return [*self._free, *self._idle]

    def cached_pages(self) -> int:
        return len(self._hash_of)

    def is_cached(self, page: int) -> bool:
        return page in self._hash_of

    def digest(self) -> bytes:
        """The chain hashes of every cached page, for the load report."""
        return b"".join(self._page_of)

    # ---- taking and giving back --------------------------------------------------------
    def take(self, n: int) -> list[int] | None:
        """``n`` pages for one request to write (count 1 each), or None if the pool has not
        that many; a clean page first, else the least recently used cached one."""
        if n > self.available():
            return None
        out = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)
                del self._page_of[self._hash_of.pop(page)]
                self.evictions += 1
            self.refs[page] = 1
            out.append(page)
        return out

    def hold(self, pages: list[int]) -> None:
        """One more reference to each of ``pages`` (cached pages a request reuses)."""
        for page in pages:
            if self.refs[page] == 0:
                del self._idle[page]
            self.refs[page] += 1

    def release(self, pages: list[int]) -> None:
        """One reference less to each of ``pages``. Given back last page first, so that a
        request's later pages are evicted before its earlier ones (which more requests share)."""
        for page in reversed(pages):
            if self.refs[page] <= 0:
                raise ValueError(f"page {page} released more often than taken")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self._hash_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    # ---- the prefix index --------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached pages of the longest prefix of ``hashes`` (not yet held)."""
        out = []
        for h in hashes:
            page = self._page_of.get(h)
            if page is None:
                break
            out.append(page)
        return out

    def publish(self, page: int, page_hash: bytes) -> None:
        """``page`` (held, every position written) has this content: others may reuse it. If
        another page already holds the same content, this one stays private."""
        if self.cache and page not in self._hash_of and page_hash not in self._page_of:
            self._hash_of[page] = page_hash
            self._page_of[page_hash] = page

    def forget(self) -> None:
        """Drop the whole index (the workers' caches can no longer be trusted); cached pages
        nobody holds become free, held ones stay with their requests."""
        for page in self._idle:
            self._free.append(page)
        self._idle.clear()
        self._hash_of.clear()
        self._page_of.clear()
