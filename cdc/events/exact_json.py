"""JSON text -> Python values with exact numbers: how cdc reads every JSON it wrote (event values,
schema headers, transaction, schema change and origin records).

Integers are ``int`` (``Decimal`` beyond 4,000 digits, where Python's ``int`` refuses to read text),
every other number is ``Decimal``. Nothing is rounded through ``float``.
"""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

# Python refuses to turn more than 4,300 digits of text into an int (sys.int_max_str_digits), and
# also to print such an int. Decimal has no such limit, both ways.
_INT_DIGITS = 4000


def _exact_int(text: str) -> int | Decimal:
    return int(text) if len(text) <= _INT_DIGITS else Decimal(text)


_FAST = json.JSONDecoder(parse_float=Decimal)  # ints through C: raises ValueError past the limit
EXACT = json.JSONDecoder(parse_float=Decimal, parse_int=_exact_int)


def loads(data: bytes | str) -> Any:
    """JSON text (UTF-8 bytes or str) -> Python values with exact numbers. Raises ValueError."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        return _FAST.decode(text)
    except json.JSONDecodeError:
        raise
    except ValueError:  # an integer of more digits than int() reads: again, the exact way
        return EXACT.decode(text)
