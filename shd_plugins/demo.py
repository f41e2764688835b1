"""Embedded default demo (digits). Placeholder until the demo issue lands."""


def main() -> None:
    print("shd_plugins demo: not built yet (the embedded-default demo issue is open).")


if __name__ == "__main__":
    main()
