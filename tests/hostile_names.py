"""Task and exception names an exposition format must escape or carry.

Quotes, backslashes (one before an `n`, to tempt a naive unescape), a newline,
unicode beyond the BMP, and 10 KB. Shared by the worker app and the tests.
"""

HOSTILE = ['t.quote " q', "t.back \\ slash \\n", "t.new\nline", "t.unicodé ✓ 名前 🚀", "t." + "y" * 10_000]
