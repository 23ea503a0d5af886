from vigild.cli import main

raise SystemExit(main())
