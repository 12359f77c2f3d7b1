"""Run records -> Markdown and self-contained HTML reports (plots with matplotlib, formulas with mathtext)."""
