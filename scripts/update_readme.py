"""Regenerate the settings table and the CLI reference in README.md."""

from lungsql.client.docs import README, render

if __name__ == "__main__":
    README.write_text(render(README.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"updated {README}")
