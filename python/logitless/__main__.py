from logitless.cli import main

raise SystemExit(main())
