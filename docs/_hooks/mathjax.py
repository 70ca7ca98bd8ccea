"""MkDocs hook: serve MathJax from the site itself, not from a CDN.

The maths of the docs is typeset by MathJax 3 in the reader's browser. Its files come
from the `django-static-mathjax` package (a pinned dependency of the `docs` extra: a
copy of the MathJax distribution in a wheel, with no dependencies of its own despite
its name), and this hook adds them to the built site under `javascripts/mathjax/`, so
that the pages render their equations without a network connection.
"""

import os

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files


TARGET = "javascripts/mathjax"
# The one combined bundle the pages load (see `extra_javascript` in mkdocs.yml);
# the other combined bundles are left out, the components it loads lazily (fonts,
# TeX extensions, accessibility, menu) are copied.
BUNDLE = "tex-mml-chtml.js"


def _source() -> str:
    try:
        import mathjax
    except ImportError as e:
        raise PluginError(
            "the docs serve MathJax from the `django-static-mathjax` package; install "
            'the docs extra: pip install -e ".[docs]"'
        ) from e
    return os.path.join(os.path.dirname(mathjax.__file__), "static", "mathjax", "es5")


def on_files(files: Files, config) -> Files:
    source = _source()
    for root, _, names in os.walk(source):
        relative_root = os.path.relpath(root, source)
        for name in sorted(names):
            if relative_root == "." and name.endswith(".js") and name != BUNDLE:
                continue
            path = os.path.normpath(os.path.join(relative_root, name))
            files.append(
                File(
                    path,
                    src_dir=source,
                    dest_dir=config["site_dir"],
                    use_directory_urls=False,
                    dest_uri=f"{TARGET}/{path.replace(os.sep, '/')}",
                )
            )
    return files
