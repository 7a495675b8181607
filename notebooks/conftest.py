"""nbval: plotly figures, their static PNGs and HTML are compared by eye, not byte for byte (Plotly 7 emits only
its JSON mime type, which sanitizers do not reach; the PNG beside it is for exports); everything printed as text is
compared strictly."""


def pytest_collectstart(collector):
    if collector.fspath and collector.fspath.ext == ".ipynb":
        collector.skip_compare += ("application/vnd.plotly.v1+json", "image/png", "text/html", "stderr",
                                   "application/vnd.jupyter.widget-view+json")
