"""Kernel names as people read them, from the demangled signatures both readers see.

Kineto writes only the signature; nsys writes a ``shortName`` as well, which drops the
namespaces and the template head that tell kernels of the same base name apart. Both readers
take the name from the signature here, so that one kernel has one name whatever the format.
"""

from __future__ import annotations

import re

_BRACKET = re.compile(r"[(<\[{)>\]}]")


#: Anonymous namespaces as demanglers spell them (GNU, and nsys's ``<unnamed>``): kept as is.
_ANONYMOUS = ("(anonymous namespace)", "<unnamed>")
_ANONYMOUS_MARKS = ("\x01anonymous-namespace\x01", "\x01unnamed\x01")


def short_kernel_name(signature: str) -> str:
    """Kernel name of a demangled signature: namespaces and template head kept, the template
    and call arguments cut, the return type dropped.

    ``void dpsk::ep::internode::combine<bf16, 8>(int4*, ...)`` -> ``dpsk::ep::internode::combine<...>``;
    ``ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)`` -> ``ncclDevKernel_SendRecv``;
    ``void at::native::(anonymous namespace)::foo<float, 4>(int)`` ->
    ``at::native::(anonymous namespace)::foo<...>``. Intranode and internode kernels, and a
    kernel and an annotation of the same base name, stay apart. Names without any of that
    punctuation come back unchanged.
    """
    if not any(mark in signature for mark in "(<: "):
        return signature
    text = signature
    for spelled, mark in zip(_ANONYMOUS, _ANONYMOUS_MARKS):
        text = text.replace(spelled, mark)
    # Keep the text outside any bracket pair up to the call's "(", a template's "<...>" as
    # such; only the brackets are visited in Python.
    outer: list[str] = []
    depth = 0
    last = 0
    for match in _BRACKET.finditer(text):
        position = match.start()
        mark = text[position]
        if mark in "(<[{":
            if depth == 0:
                outer.append(text[last:position])
                if mark == "(":  # the call's arguments: the name ends here
                    last = None
                    break
                if mark == "<":
                    outer.append("<...>")
            depth += 1
        else:
            depth -= 1
            if depth < 0:  # unbalanced ("operator>" and the like): keep it simple
                return signature.split("(", 1)[0].strip() or signature
            if depth == 0:
                last = position + 1
    if last is not None:
        if depth != 0:
            return signature.split("(", 1)[0].strip() or signature
        outer.append(text[last:])
    words = "".join(outer).split()
    if not words:
        return signature
    name = words[-1]
    for spelled, mark in zip(_ANONYMOUS, _ANONYMOUS_MARKS):
        name = name.replace(mark, spelled)
    name = name.strip(":")
    return name or signature
