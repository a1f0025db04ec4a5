"""Read an extract's workbook with openpyxl and print what a reader of it sees, as JSON:
sheets, frozen panes, autofilters, column widths, charts with their data ranges, and cells."""

import json
import sys

import openpyxl


def title_of(chart):
    try:
        return "".join(r.t for p in chart.title.tx.rich.p for r in (p.r or []))
    except AttributeError:
        return None


def ref(data):
    if data is None:
        return None
    for kind in ("numRef", "strRef"):
        r = getattr(data, kind, None)
        if r is not None:
            return r.f
    return None


def main(path):
    wb = openpyxl.load_workbook(path)
    out = {"sheets": [], "properties": {"title": wb.properties.title,
                                         "created": str(wb.properties.created)}}
    for ws in wb.worksheets:
        charts = []
        for c in ws._charts:
            series = []
            for s in c.series:
                series.append({
                    "values": ref(s.val) or ref(s.yVal),
                    "categories": ref(s.cat) or ref(s.xVal),
                })
            charts.append({"type": c.tagname, "title": title_of(c), "series": series})
        widths = {k: v.width for k, v in ws.column_dimensions.items() if v.width}
        rows = [[c for c in r] for r in ws.iter_rows(values_only=True)]
        formats = {}
        for r in ws.iter_rows(min_row=5, max_row=5):
            for c in r:
                if c.value is not None:
                    formats[c.column_letter] = c.number_format
        out["sheets"].append({
            "name": ws.title,
            "freeze": ws.freeze_panes,
            "autofilter": ws.auto_filter.ref,
            "widths": widths,
            "charts": charts,
            "rows": rows,
            "formats": formats,
        })
    json.dump(out, sys.stdout, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
