"""Plain-text tables for the bench's sections."""


def render_table(columns, rows):
    """Lines of a table: the header, a rule, then `rows` (tuples of
    strings); the first column left-aligned, the others right-aligned.
    No lines at all without rows."""
    if not rows:
        return []
    widths = [max(len(row[i]) for row in rows + [columns])
              for i in range(len(columns))]

    def render(row):
        return " | ".join(cell.ljust(width) if index == 0
                          else cell.rjust(width)
                          for index, (cell, width)
                          in enumerate(zip(row, widths)))
    rule = "-+-".join("-" * width for width in widths)
    return [render(columns), rule] + [render(row) for row in rows]
