from kvrouter.entry import main

main()
